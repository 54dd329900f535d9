"""Run directories: both checkpoint kinds found, chosen, pruned and cleaned; the damaged-checkpoint fallback; the one
finished-run rule; the refusals (--no-resume over a run, mixed kinds); the interrupted tail. The recipes' own
fallback tests (pretrain, sft, dpo, cpt; full and LoRA) run the same code end to end."""

import json
from dataclasses import dataclass, field

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.errors import LmforgeError
from lmforge.model.config import preset
from lmforge.model.lora import apply_lora
from lmforge.model.transformer import Transformer
from lmforge.training import rundir
from lmforge.training.distributed import Runtime
from lmforge.training.optim import build_optimizer
from lmforge.training.report import write_summary

RT = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@dataclass
class Train:
    max_steps: int = 4
    lr: float = 1e-3


@dataclass
class Cfg:
    out: str = "runs/x"
    train: Train = field(default_factory=Train)


def _model(lora=False):
    torch.manual_seed(0)
    m = Transformer(preset("test").replace(n_layers=1))
    m.init_weights(0)
    if lora:
        apply_lora(m, ["q", "v"], rank=2, seed=0)
    return m


def _saver(model, lora, tmp_path, step_box):
    opt = build_optimizer(model, 1e-3, 0.0, (0.9, 0.95))
    base = tmp_path / "base" if lora else None

    def save(out):
        return rundir.save_checkpoint(model, opt, RT, out, trainer_state={"step": step_box[0]}, lineage={},
                                      adapter_base=base)
    return save


@pytest.mark.parametrize("kind", [rundir.MODEL, rundir.ADAPTER])
def test_checkpoints_of_one_kind_are_found_pruned_and_cleaned(tmp_path, kind):
    run = tmp_path / "run"
    model = _model(lora=kind == rundir.ADAPTER)
    step = [0]
    save = _saver(model, kind == rundir.ADAPTER, tmp_path, step)
    for step[0] in (1, 2, 3):
        assert rundir.save_step(run, step[0], save, keep_last=2, kind=kind) == rundir.step_dir(run, step[0])
    assert [s for s, _ in rundir.checkpoints(run, kind)] == [3, 2]  # pruned to the newest two
    other = rundir.ADAPTER if kind == rundir.MODEL else rundir.MODEL
    assert rundir.checkpoints(run, other) == []  # the kinds are told apart
    assert [d.name for d in rundir.resume_candidates(run, kind)] == ["step-3", "step-2"]
    # leftovers of a killed write or delete never count and are removed at the next start
    (run / "checkpoints" / ".step-4.tmp-1-2").mkdir()
    (run / ".final.old-1-2").mkdir()
    rundir.clean_partial(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert not (run / ".final.old-1-2").exists()


def test_final_with_trainer_state_is_the_newest_candidate(tmp_path):
    run = tmp_path / "run"
    step = [0]
    save = _saver(_model(), False, tmp_path, step)
    step[0] = 2
    rundir.save_step(run, 2, save, keep_last=2)
    step[0] = 4
    save(rundir.final_dir(run))
    assert [d.name for d in rundir.resume_candidates(run)] == ["final", "step-2"]


@pytest.mark.parametrize("kind", [rundir.MODEL, rundir.ADAPTER])
def test_load_newest_skips_damaged_checkpoints(tmp_path, kind):
    run = tmp_path / "run"
    step = [0]
    save = _saver(_model(lora=kind == rundir.ADAPTER), kind == rundir.ADAPTER, tmp_path, step)
    for step[0] in (1, 2):
        rundir.save_step(run, step[0], save, keep_last=2, kind=kind)
    weights = "adapter_model.safetensors" if kind == rundir.ADAPTER else "model.safetensors"
    read = (lambda d: ckpt.read_adapter(d)[1]) if kind == rundir.ADAPTER else ckpt.load_model
    (rundir.step_dir(run, 2) / weights).write_bytes(b"not safetensors")
    logs = []
    resumed = rundir.load_newest(rundir.resume_candidates(run, kind), read, logs.append)
    assert resumed.path.name == "step-1" and resumed.step == 1 and resumed.weights
    assert "skipping damaged checkpoint" in logs[0] and "step-2" in logs[0]
    assert logs[1].startswith("resuming from step 1")
    # every one damaged: an error that says what to do, never a silent fresh start
    (rundir.step_dir(run, 1) / "trainer_state" / "state.pt").write_bytes(b"junk")
    with pytest.raises(LmforgeError, match="no checkpoint in the run directory could be loaded"):
        rundir.load_newest(rundir.resume_candidates(run, kind), read, logs.append)
    assert rundir.load_newest([], read, logs.append) is None


def _finish(run, cfg, result="final"):
    from lmforge.config import save_config

    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    if result == "final":
        ckpt.save_model(_model(), rundir.final_dir(run))
    else:
        ckpt.save_adapter(_model(lora=True), rundir.adapter_dir(run))
    write_summary(run, {"stage": "test", "status": rundir.COMPLETE})


@pytest.mark.parametrize("result", ["final", "adapter"])
def test_the_finished_run_rule(tmp_path, result):
    run, cfg = tmp_path / "run", Cfg()
    assert not rundir.finished(run, cfg)  # nothing there yet
    _finish(run, cfg, result)
    assert rundir.finished(run, cfg)
    logs = []
    assert rundir.open_run(run, cfg, rundir.MODEL, resume=True, log=logs.append) is None
    assert logs[0].startswith("nothing to do")
    # the same directory under another config: refused, naming what differs
    with pytest.raises(LmforgeError, match=r"different config \(train.max_steps: 4 there, 8 here\)"):
        rundir.finished(run, Cfg(train=Train(max_steps=8)))
    # not finished: the summary says otherwise, or the result is gone
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps(dict(summary, status="stopped at step 2: interrupted")))
    assert not rundir.finished(run, Cfg(train=Train(max_steps=8)))
    (run / "summary.json").write_text(json.dumps(summary))
    for d in (rundir.final_dir(run), rundir.adapter_dir(run)):
        if d.exists():
            import shutil

            shutil.rmtree(d)
    assert not rundir.finished(run, Cfg(train=Train(max_steps=8)))


def test_open_run_refusals_and_config(tmp_path):
    run = tmp_path / "run"
    step = [1]
    rundir.save_step(run, 1, _saver(_model(lora=True), True, tmp_path, step), keep_last=2, kind=rundir.ADAPTER)
    with pytest.raises(LmforgeError, match="holds LoRA adapter checkpoints.*with --lora"):
        rundir.open_run(run, Cfg(), rundir.MODEL, resume=True, log=print)
    with pytest.raises(LmforgeError, match="drop --no-resume"):
        rundir.open_run(run, Cfg(), rundir.ADAPTER, resume=False, log=print)
    found = rundir.open_run(run, Cfg(), rundir.ADAPTER, resume=True, log=print)
    assert [d.name for d in found] == ["step-1"] and (run / "config.yaml").is_file()
    fresh = tmp_path / "fresh"
    assert rundir.open_run(fresh, Cfg(), rundir.MODEL, resume=False, log=print) == []


def test_interrupted_saves_prunes_and_returns_130(tmp_path):
    run = tmp_path / "run"
    step = [0]
    save = _saver(_model(), False, tmp_path, step)
    logs = []
    assert rundir.interrupted(run, 0, save, 2, rundir.MODEL, logs.append) == rundir.EXIT_INTERRUPTED == 130
    assert logs == ["stopped before the first step; nothing saved"] and not run.exists()
    for step[0] in (1, 2, 3):
        assert rundir.interrupted(run, step[0], save, 2, rundir.MODEL, logs.append) == 130
    assert [s for s, _ in rundir.checkpoints(run)] == [3, 2]
    assert logs[-1] == f"stopped at step 3: checkpoint {rundir.step_dir(run, 3)}; run the same command to resume"
