"""What a checkpoint's trainer_state/ holds beyond the recipe's own fields, and how a run gets it back: the
optimizer state (keyed by parameter name, so any world size and parallel mode can resume it) and the RNG states
of torch (and CUDA), numpy and Python; plus `seed_everything`, the one --seed for every RNG.

The recipe adds its own fields (step, tokens and seconds spent, the data loader's position, ...). Where the
checkpoints live, which one to resume and when a run is finished: training/rundir.py.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from lmforge.training.distributed import load_optimizer_state


def rng_state() -> dict:
    """RNG states of torch (CPU and CUDA), numpy's global generator and Python's `random`, as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """One --seed for every RNG."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> None:
    """The optimizer and RNG states of a checkpoint's trainer state (the weights and data position are the
    recipe's to load)."""
    load_optimizer_state(model, optimizer, trainer_state["optimizer"])
    set_rng_state(trainer_state["rng"])
