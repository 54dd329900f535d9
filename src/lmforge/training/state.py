"""Checkpoints of a training run: what goes into trainer_state, where checkpoints go, which one to resume.

A run directory holds checkpoints/step-N/ (every save_every steps, the newest keep_last kept) and final/ at
the end; each is a Hugging Face model directory written atomically by lmforge.checkpoint.save_model, with
trainer_state/ inside it: optimizer state (keyed by parameter name, so any world size and parallel mode can
resume it), the step, tokens and seconds spent, the data loader's position, and the RNG states of torch (and
CUDA), numpy and Python. Because save_model renames a finished temporary directory into place, a run killed
at any moment (SIGKILL included) leaves either a whole checkpoint or none: `resume_point` only ever returns
complete directories with trainer state, and `clean_partial` removes leftovers of interrupted writes.
Old checkpoints are renamed away before they are deleted, so a half-deleted one never looks whole either.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge import checkpoint as ckpt
from lmforge.errors import LmforgeError
from lmforge.training.distributed import Runtime, barrier, full_model_state, full_optimizer_state, unwrap

if TYPE_CHECKING:
    import torch


def rng_state() -> dict:
    """RNG states of torch (CPU and CUDA), numpy's global generator and Python's `random`, as plain data."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """One --seed for every RNG."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step}"


def final_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "final"


def _step_of(d: Path) -> int | None:
    try:
        state = ckpt.load_trainer_state(d)
    except LmforgeError:
        return None
    return int(state["step"]) if state and "step" in state else None


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints with trainer state, newest first: final/ (if it is the newest), then checkpoints/step-N."""
    steps = [d for _, d in ckpt.checkpoints(run_dir) if (d / "trainer_state" / "state.pt").is_file()]
    fin = final_dir(run_dir)
    if ckpt.is_complete(fin) and (fin / "trainer_state" / "state.pt").is_file():
        fin_step = _step_of(fin)
        newest = int(steps[0].name.split("-")[1]) if steps else -1
        if fin_step is not None and fin_step >= newest:
            return [fin] + steps
    return steps


def resume_point(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint with trainer state, or None."""
    found = resume_candidates(run_dir)
    return found[0] if found else None


def clean_partial(run_dir: str | Path) -> None:
    """Remove temporary and half-deleted directories that a killed run may have left."""
    for parent in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if parent.is_dir():
            for d in parent.iterdir():
                if d.name.startswith(".") and (".tmp-" in d.name or ".old-" in d.name or ".deleting" in d.name):
                    shutil.rmtree(d, ignore_errors=True)


def _remove(d: Path) -> None:
    gone = d.parent / f".{d.name}.deleting-{time.time_ns()}"
    os.replace(d, gone)  # atomic: the checkpoint stops looking valid before any file is deleted
    shutil.rmtree(gone, ignore_errors=True)


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest keep_last step checkpoints."""
    for _, d in ckpt.checkpoints(run_dir)[max(keep_last, 1):]:
        _remove(d)


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, out: Path, *,
         trainer_state: dict, tokenizer: Any = None, lineage: dict | None = None) -> Path:
    """Write a resumable checkpoint to `out` (collective under FSDP; rank 0 writes, the others wait).

    trainer_state: the recipe's own fields (step, tokens, loader position, ...); the optimizer state and RNG
    states are added here.
    """
    weights = full_model_state(model)
    optim = full_optimizer_state(model, optimizer)
    if rt.is_main:
        state = dict(trainer_state, optimizer=optim, rng=rng_state(), world_size=rt.world_size)
        ckpt.save_model(unwrap(model), out, tokenizer=tokenizer, lineage=lineage, trainer_state=state,
                        state_dict=weights)
    barrier(rt)
    return out
