"""Learning-rate schedules as pure functions of the step: linear warmup, then cosine decay or
warmup-stable-decay (WSD; Hu et al. 2024, MiniCPM), or constant.

`lr_at(step, progress)` separates the two clocks: warmup counts optimizer steps, while the decay follows
`progress` in [0, 1], the fraction of the post-warmup budget spent. training/budget.py computes progress from
whatever bounds the run (steps, or tokens, or, when only a time limit is given, seconds), so one schedule
serves every stopping rule. The schedule's state is the step, which lives in the trainer state.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(step: int, progress: float, base_lr: float, warmup_steps: int = 0, kind: str = "cosine",
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based).

    step < warmup_steps: base_lr * (step + 1) / warmup_steps.
    Afterwards, with p = clamp(progress, 0, 1) and floor = base_lr * min_lr_ratio:
      cosine    floor + (base_lr - floor) * (1 + cos(pi p)) / 2
      wsd       base_lr until p = 1 - decay_fraction, then linear to floor at p = 1
      constant  base_lr
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    floor = base_lr * min_lr_ratio
    if kind == "cosine":
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "wsd":
        start = 1.0 - decay_fraction
        if p <= start or decay_fraction <= 0:
            return base_lr
        return base_lr - (base_lr - floor) * (p - start) / decay_fraction
    return base_lr


def step_progress(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Fraction of the post-warmup steps done before optimizer step `step`."""
    span = total_steps - warmup_steps
    return 1.0 if span <= 0 else (step - warmup_steps) / span


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
