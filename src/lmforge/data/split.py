"""The held-out share of a record set: which SFT examples or preference pairs a run validates on instead of
training on, when the user gives no separate --val-data file.

Rule: with fraction f > 0 and n >= 2 records, max(1, floor(n * f)) records chosen by a seeded shuffle are held out,
and at least one record is always left to train on. So a small file still gets a validation figure (at least one
record) rather than having --val-fraction ignored, and the same seed holds out the same records on every run
(resume depends on it: the training set must not change between the interrupted and the resumed run).
"""

from __future__ import annotations

import random
from typing import TypeVar

from lmforge.errors import LmforgeError

T = TypeVar("T")


def holdout_split(records: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held_out), both in the records' original order."""
    if not 0 <= fraction < 1:
        raise LmforgeError(f"--val-fraction must be at least 0 and below 1, got {fraction}")
    n = len(records)
    if fraction == 0 or n < 2:
        return list(records), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, int(n * fraction))])  # at most n - 1, as fraction < 1
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
