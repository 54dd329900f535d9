"""Run-directory chores the stage-2 recipes share, on top of training/state.py: where to resume from and how to write
a resumable checkpoint when the weights are a LoRA adapter rather than a whole model, pruning, peak memory, and
the sections of summary.json every finetuning run has. The loops themselves stay in sft.py, dpo.py and cpt.py.

Full finetuning uses training/state.py unchanged (checkpoints are model directories). LoRA checkpoints are PEFT
adapter directories with the same trainer_state/ inside (optimizer state keyed by parameter name, RNG states, step,
data position), found and pruned here because checkpoint.latest_checkpoint looks for model weights.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path
from typing import Any

from lmforge import checkpoint as ckpt
from lmforge.config import save_config
from lmforge.errors import LmforgeError
from lmforge.finetune.weights import Base
from lmforge.training import state as tstate
from lmforge.training.distributed import Runtime, full_optimizer_state


def open_run(cfg: Any, lora: bool) -> tuple[Runtime, Path, Path | None] | None:
    """The prelude every stage-2 recipe shares: device and threads, 'nothing to do' for a finished run, the run
    directory and its config, where to resume from, and the seeds. Returns (runtime, run_dir, resume_from), or
    None when this exact run already finished (its final/ is printed, as a finished run's result)."""
    import torch

    from lmforge.training import distributed

    t = cfg.train
    rt = distributed.setup(t.device)
    single_device(rt, t)
    if t.threads:
        torch.set_num_threads(t.threads)
    run_dir = Path(cfg.out)
    if t.resume and finished(cfg, run_dir):
        log(f"nothing to do: {run_dir} already holds this finished run (its report: {run_dir / 'report.md'})")
        print(run_dir / "final")
        return None
    start(cfg, run_dir)
    resume_from = resume_point(run_dir, lora) if t.resume else None
    if resume_from is None:
        check_resume_kind(run_dir, lora)
    tstate.seed_everything(t.seed)
    return rt, run_dir, resume_from


def single_device(rt: Runtime, t: Any) -> None:
    """Stage 2 trains on one device, eagerly: refuse the TrainConfig options it does not implement."""
    if rt.distributed:
        raise LmforgeError("finetuning runs on one device (one process); launch it without torchrun "
                           "(multi-device data parallelism is pretrain's)")
    if t.compile:
        raise LmforgeError("--train.compile is not supported by finetuning (LoRA's adapter switching would "
                           "recompile); drop it")


def finished(cfg: Any, run_dir: Path) -> bool:
    """True when run_dir holds a completed run of this very config (running it again has nothing to do)."""
    import json

    import yaml

    from lmforge.config import to_dict

    summary, saved = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary.is_file() and saved.is_file()):
        return False
    try:
        done = json.loads(summary.read_text()).get("status") == "complete"
        same = yaml.safe_load(saved.read_text()) == yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    except (json.JSONDecodeError, yaml.YAMLError):
        return False
    if done and not same:
        raise LmforgeError(f"{run_dir} holds a finished run with a different config; use another --out, or "
                           "--no-train.resume to train again there")
    return done


def start(cfg: Any, run_dir: Path) -> None:
    """Create the run directory, remove leftovers of interrupted writes, save the resolved config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tstate.clean_partial(run_dir)
    save_config(cfg, run_dir / "config.yaml")


def _adapter_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = run_dir / "checkpoints"
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = re.fullmatch(r"step-(\d+)", d.name)
            if m and ckpt.is_adapter_dir(d) and (d / "trainer_state" / "state.pt").is_file():
                found.append((int(m.group(1)), d))
    return sorted(found, reverse=True)


def resume_point(run_dir: Path, lora: bool) -> Path | None:
    """The newest complete, resumable checkpoint of this run (adapter checkpoints for LoRA runs)."""
    if not lora:
        return tstate.resume_point(run_dir)
    found = _adapter_checkpoints(run_dir)
    return found[0][1] if found else None


def check_resume_kind(run_dir: Path, lora: bool) -> None:
    """A run directory holds LoRA or full checkpoints, never a mix: refuse to continue one as the other."""
    other = ckpt.latest_checkpoint(run_dir) if lora else (_adapter_checkpoints(run_dir) or [None])[0]
    if other is not None:
        kind = "full-model" if lora else "LoRA adapter"
        raise LmforgeError(f"{run_dir} holds {kind} checkpoints from an earlier run; use another --out, or "
                           f"{'drop' if lora else 'add'} --lora to continue it")


def save_resumable(base: Base, model: Any, optimizer: Any, rt: Runtime, out: Path, trainer_state: dict,
                   lineage: dict) -> Path:
    """A checkpoint that resumes exactly: weights (or adapter), optimizer, RNG, step and data position."""
    if not base.lora:
        return tstate.save(model, optimizer, rt, out, trainer_state=trainer_state, tokenizer=base.tokenizer,
                           lineage=lineage)
    state = dict(trainer_state, optimizer=full_optimizer_state(model, optimizer), rng=tstate.rng_state(),
                 world_size=rt.world_size)
    return ckpt.save_adapter(model, out, base_model_name_or_path=base.path.resolve(), lineage=lineage,
                             trainer_state=state, tokenizer=base.tokenizer)


def save_and_prune(base: Base, model: Any, optimizer: Any, rt: Runtime, run_dir: Path, step: int,
                   trainer_state: dict, lineage: dict, keep_last: int) -> Path:
    """Checkpoint step `step` (resumable) and keep only the newest `keep_last`; returns the checkpoint's path."""
    where = save_resumable(base, model, optimizer, rt, tstate.step_dir(run_dir, step), trainer_state, lineage)
    prune(run_dir, keep_last, base.lora)
    return where


def record_line(record: dict, keys: tuple[str, ...]) -> str:
    """The progress bar's text for a metrics record: the named fields, floats to 4 significant digits."""
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                    if k in keys and v is not None)


def restore(model: Any, optimizer: Any, state: dict) -> None:
    """Optimizer and RNG state from a checkpoint's trainer state (weights are loaded by load_base)."""
    from lmforge.training.distributed import load_optimizer_state

    load_optimizer_state(model, optimizer, state["optimizer"])
    tstate.set_rng_state(state["rng"])


def prune(run_dir: Path, keep_last: int, lora: bool) -> None:
    if not lora:
        tstate.prune(run_dir, keep_last)
        return
    import os
    import shutil
    import time

    for _, d in _adapter_checkpoints(run_dir)[max(keep_last, 1):]:
        gone = d.parent / f".{d.name}.deleting-{time.time_ns()}"
        os.replace(d, gone)
        shutil.rmtree(gone, ignore_errors=True)


def peak_memory_bytes(device: Any) -> int:
    """Peak memory of this process: CUDA allocator peak on a GPU, else the peak resident set size."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def model_section(base: Base, lora: Any) -> dict:
    from lmforge.model.accounting import n_params

    sec = {"base": str(base.path), "parameters": n_params(base.model.cfg), "trainable_parameters": base.trainable,
           "trainable_share": base.trainable / max(1, base.total), "method": "LoRA" if base.lora else "full"}
    if base.lora:
        sec.update(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                   lora_targets=",".join(sorted(set(t for x in lora.targets for t in str(x).split(",")))))
    return sec


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
