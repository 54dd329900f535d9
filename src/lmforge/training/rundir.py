"""A run directory, for every training recipe (pretrain, finetune sft/dpo/cpt; full weights or LoRA): where its
checkpoints live, which one a run resumes from, what is pruned, and when the run is finished.

    runs/NAME/config.yaml          the resolved config (saved at every start)
              checkpoints/step-N/  resumable checkpoints, the newest keep_last kept
              final/               the result: a Hugging Face model directory (LoRA runs: the merged model)
              adapter/             LoRA runs: the result as a PEFT adapter directory
              summary.json, report.md, metrics.jsonl, loss.png

Two kinds of checkpoint, never mixed in one directory: MODEL (a whole Hugging Face model directory: pretrain, full
finetuning) and ADAPTER (a PEFT adapter directory: LoRA finetuning). Both hold trainer_state/ (optimizer state
keyed by parameter name, RNG states, step, data position; see training/state.py). Their file formats are
checkpoint.py's; this module only finds, chooses, saves and deletes them.

Safety. checkpoint.py writes every directory atomically (a temporary directory renamed into place) and old ones
are renamed away before deletion, so a run killed at any moment (SIGKILL included) leaves whole checkpoints or
none; `clean_partial` removes the leftovers of interrupted writes at the next start. A checkpoint that looks whole
can still be damaged (a disk error, a user's edit): `load_newest` reports it and falls back to the next older
one, for every recipe and both kinds, and stops with an error only when none loads (never a silent restart).

The one rule for a finished run (`finished`): a run directory is finished when its summary.json says status
"complete" (written last, after the result), its result is whole (final/, or adapter/ for a LoRA run saved
without merging), and its config.yaml equals the config being run, leaving out the keys that say only how to
compute, not what (`HOW_KEYS`: --compile). The same command then has nothing to do; any
other config there is an error (use another --out; to train the result further, start a new run from it with
--base RUN/final). Why this rule and not a step count (HF Trainer's "the checkpoint is at step N, the budget says
N: nothing to do; raise the budget to train on"):
  - a run directory describes one run: its config.yaml, metrics, report and final/ come from one config. Training
    a finished run on under a larger budget leaves a final/ that no config reproduces (the learning rate already
    decayed for the old budget re-rises for the new one), against "the resolved config is saved with every run"
    and "the same config and seed reproduce the same losses" (DESIGN.md);
  - it holds for every budget (steps, tokens, time, epochs) and both kinds without loading weights, and needs no
    trainer state in the result (a LoRA run's final/ is a merged model without one);
  - continuing a finished model is still one command: a new run with --base RUN/final (finetune cpt/sft).
An unfinished run (interrupted, killed, or a summary saying so) resumes from its newest loadable checkpoint under
whatever budget the command gives, so a killed run can be finished with another --max-steps; the checkpoint's own
checks (model shape, data position, seed) still apply. With resume off (--no-resume), a directory that already
holds checkpoints or a result is refused rather than mixed with a new run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge import checkpoint as ckpt
from lmforge.config import save_config, to_dict
from lmforge.errors import LmforgeError
from lmforge.training.distributed import Runtime, barrier, full_model_state, full_optimizer_state, unwrap
from lmforge.training.state import rng_state

MODEL, ADAPTER = "model", "adapter"
_NAMES = {MODEL: "full-model", ADAPTER: "LoRA adapter"}
COMPLETE = "complete"  # summary.json's status once a run has written its result
EXIT_INTERRUPTED = 130  # what a stopped run returns (128 + SIGINT, as shells report Ctrl-C)


# ---- layout -------------------------------------------------------------------------------------------------
def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step}"


def final_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "final"


def adapter_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "adapter"


def is_checkpoint(path: str | Path, kind: str = MODEL) -> bool:
    """A whole directory of this kind (its files are there; whether they load is load_newest's question)."""
    return ckpt.is_adapter_dir(path) if kind == ADAPTER else ckpt.is_complete(path)


def _has_state(d: Path) -> bool:
    return (d / "trainer_state" / "state.pt").is_file()


# ---- finding and choosing -----------------------------------------------------------------------------------
def checkpoints(run_dir: str | Path, kind: str = MODEL) -> list[tuple[int, Path]]:
    """(step, path) of every whole checkpoints/step-N of this kind, newest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = re.fullmatch(r"step-(\d+)", d.name)
            if m and d.is_dir() and is_checkpoint(d, kind):
                found.append((int(m.group(1)), d))
    return sorted(found, reverse=True)


def _step_of(d: Path) -> int | None:
    try:
        state = ckpt.load_trainer_state(d)
    except LmforgeError:
        return None
    return int(state["step"]) if state and "step" in state else None


def resume_candidates(run_dir: str | Path, kind: str = MODEL) -> list[Path]:
    """Whole checkpoints with trainer state, newest first: final/ (when it has trainer state and is the newest),
    then checkpoints/step-N."""
    steps = [d for _, d in checkpoints(run_dir, kind) if _has_state(d)]
    fin = final_dir(run_dir)
    if is_checkpoint(fin, kind) and _has_state(fin):
        fin_step = _step_of(fin)
        newest = int(steps[0].name.split("-")[1]) if steps else -1
        if fin_step is not None and fin_step >= newest:
            return [fin] + steps
    return steps


@dataclass
class Resumed:
    """The checkpoint a run continues from: its directory, its trainer state, and what the recipe's loader read."""

    path: Path
    state: dict
    weights: Any

    @property
    def step(self) -> int:
        return int(self.state["step"])


def load_newest(candidates: list[Path], load: Callable[[Path], Any], log: Callable[[str], None]) -> Resumed | None:
    """The newest candidate whose trainer state and weights (`load(directory)`) both read; None without candidates.

    A damaged one (an LmforgeError while reading) is reported and skipped for the next older one; when every
    candidate is damaged the run stops with an error rather than silently starting over.
    """
    problems = []
    for d in candidates:
        try:
            state = ckpt.load_trainer_state(d)
            if state is None or "optimizer" not in state or "step" not in state:
                raise LmforgeError(f"{d} has no usable trainer state")
            weights = load(d)
        except LmforgeError as e:
            problems.append(str(e))
            log(f"warning: skipping damaged checkpoint {d}: {e}")
            continue
        log(f"resuming from step {int(state['step'])} ({d})")
        return Resumed(d, state, weights)
    if problems:
        raise LmforgeError("no checkpoint in the run directory could be loaded (" + "; ".join(problems) + "); "
                           "delete the damaged checkpoints, or use another --out to start over")
    return None


# ---- starting ---------------------------------------------------------------------------------------------------
HOW_KEYS = ("train.compile",)  # settings that change how a run computes, not what it trains: not part of its identity


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


def finished(run_dir: str | Path, cfg: Any) -> bool:
    """True when run_dir holds this very run, finished (the rule is in the module docstring); an error when it holds
    a finished run of another config."""
    import yaml

    run_dir = Path(run_dir)
    summary, saved = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary.is_file() and saved.is_file()):
        return False
    try:
        done = json.loads(summary.read_text()).get("status") == COMPLETE
        there = yaml.safe_load(saved.read_text())
    except (json.JSONDecodeError, yaml.YAMLError, AttributeError):
        return False
    if not done or not (ckpt.is_complete(final_dir(run_dir)) or ckpt.is_adapter_dir(adapter_dir(run_dir))):
        return False
    here = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # as config.yaml holds it
    a, b = _flat(there), _flat(here)
    for k in HOW_KEYS:
        a.pop(k, None)
        b.pop(k, None)
    if a != b:
        diff = [f"{k}: {a.get(k)} there, {b.get(k)} here" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise LmforgeError(f"{run_dir} holds a finished run with a different config ({'; '.join(diff[:4])}); use "
                           f"another --out (to train its result further, start a new run with --base "
                           f"{final_dir(run_dir)})")
    return True


def open_run(run_dir: str | Path, cfg: Any, kind: str, resume: bool, log: Callable[[str], None]) -> list[Path] | None:
    """A recipe's start in its run directory: None when this run is already finished (nothing to do); else the
    directory is created, cleaned of interrupted writes and given the resolved config, and the checkpoints to
    resume from are returned, newest first (none with resume off). Call on one process (rank 0)."""
    run_dir = Path(run_dir)
    if resume and finished(run_dir, cfg):
        log(f"nothing to do: {run_dir} already holds this finished run (its report: {run_dir / 'report.md'})")
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_partial(run_dir)
    other = ADAPTER if kind == MODEL else MODEL
    if checkpoints(run_dir, other):
        raise LmforgeError(f"{run_dir} holds {_NAMES[other]} checkpoints from an earlier run, and this run writes "
                           f"{_NAMES[kind]} ones; use another --out, or continue that run as it was "
                           f"({'with' if other == ADAPTER else 'without'} --lora)")
    if not resume and (checkpoints(run_dir, kind) or final_dir(run_dir).exists() or adapter_dir(run_dir).exists()):
        raise LmforgeError(f"{run_dir} already holds checkpoints or a result; resume (drop --no-resume) or pick "
                           "another --out")
    save_config(cfg, run_dir / "config.yaml")
    return resume_candidates(run_dir, kind) if resume else []


# ---- saving and pruning ---------------------------------------------------------------------------------------
def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, out: Path, *,
                    trainer_state: dict, tokenizer: Any = None, lineage: dict | None = None,
                    adapter_base: str | Path | None = None) -> Path:
    """Write a resumable checkpoint to `out`: a model directory, or with adapter_base (the base model's path, which
    PEFT records) the model's LoRA adapter. Collective under FSDP: rank 0 writes, the others wait.

    trainer_state: the recipe's own fields (step, tokens, loader position, ...); optimizer and RNG states are added.
    """
    weights = full_model_state(model) if adapter_base is None else None
    optim = full_optimizer_state(model, optimizer)
    if rt.is_main:
        state = dict(trainer_state, optimizer=optim, rng=rng_state(), world_size=rt.world_size)
        if adapter_base is None:
            ckpt.save_model(unwrap(model), out, tokenizer=tokenizer, lineage=lineage, trainer_state=state,
                            state_dict=weights)
        else:
            ckpt.save_adapter(unwrap(model), out, base_model_name_or_path=adapter_base, lineage=lineage,
                              trainer_state=state, tokenizer=tokenizer)
    barrier(rt)
    return out


def clean_partial(run_dir: str | Path) -> None:
    """Remove temporary and half-deleted directories that a killed run may have left."""
    for parent in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if parent.is_dir():
            for d in parent.iterdir():
                if d.name.startswith(".") and (".tmp-" in d.name or ".old-" in d.name or ".deleting" in d.name):
                    shutil.rmtree(d, ignore_errors=True)


def _remove(d: Path) -> None:
    gone = d.parent / f".{d.name}.deleting-{time.time_ns()}"
    os.replace(d, gone)  # atomic: the checkpoint stops looking whole before any file is deleted
    shutil.rmtree(gone, ignore_errors=True)


def prune(run_dir: str | Path, keep_last: int, kind: str = MODEL) -> None:
    """Delete all but the newest keep_last (at least one) step checkpoints of this kind."""
    for _, d in checkpoints(run_dir, kind)[max(keep_last, 1):]:
        _remove(d)


def save_step(run_dir: str | Path, step: int, save: Callable[[Path], Path], keep_last: int, kind: str = MODEL,
              is_main: bool = True) -> Path:
    """Checkpoint step `step` with `save(directory)` and keep the newest keep_last; returns the checkpoint."""
    where = save(step_dir(run_dir, step))
    if is_main:
        prune(run_dir, keep_last, kind)
    return where


def interrupted(run_dir: str | Path, step: int, save: Callable[[Path], Path], keep_last: int, kind: str,
                log: Callable[[str], None], is_main: bool = True) -> int:
    """The tail of a stopped run (Ctrl-C, SIGTERM): checkpoint the last finished step, prune, say how to resume.
    Returns the exit status, EXIT_INTERRUPTED."""
    if step == 0:
        log("stopped before the first step; nothing saved")
        return EXIT_INTERRUPTED
    where = save_step(run_dir, step, save, keep_last, kind, is_main)
    log(f"stopped at step {step}: checkpoint {where}; run the same command to resume")
    return EXIT_INTERRUPTED
