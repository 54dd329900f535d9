"""Budget: when a training run stops, and how far along its learning-rate schedule it is. Every recipe (pretrain,
finetune sft/dpo/cpt) turns --max-steps / --max-tokens / --max-time (and, where the recipe has them, epochs)
into one Budget and asks it, once per step, `done(...)` and `progress(...)`; the schedule itself is
training/schedule.py's.

The rules, in one place:
- Stop at the first limit reached among steps, tokens and seconds of training.
- No limit given: `epochs` passes over the data when the recipe counts epochs (steps_per_epoch known: SFT, DPO),
  else the recipe's default step count (pretrain: 500), else an error asking for a budget (cpt).
- A limit must be positive; 0 or less is an error rather than "no limit".
- The schedule's length in steps (`horizon`) is the smaller of --max-steps and, when every step holds the same
  number of tokens (token shards: pretrain, cpt), --max-tokens converted to steps. When tokens per step vary
  (SFT and DPO batches hold examples of different lengths), tokens cannot be converted in advance and the
  horizon is --max-steps alone.
- Progress in [0, 1] follows the horizon when there is one (post-warmup steps done / post-warmup steps), else
  tokens (tokens / --max-tokens), else time (seconds / --max-time). The progress bar counts the same unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.training.schedule import step_progress


@dataclass(frozen=True)
class Budget:
    max_steps: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None
    horizon: int | None = None  # the schedule's length in steps, when known
    warmup_steps: int = 0

    @classmethod
    def resolve(cls, train: Any, *, tokens_per_step: int | None = None, epochs: float | None = None,
                steps_per_epoch: int | None = None, default_steps: int | None = None) -> Budget:
        """The budget of a TrainConfig-like `train` (max_steps, max_tokens, max_time, warmup_steps).

        tokens_per_step: when every step trains on this many tokens. epochs + steps_per_epoch: the recipe's budget
        when no limit is given; default_steps: the fallback after that.
        """
        steps, tokens, time = train.max_steps, train.max_tokens, train.max_time
        for flag, value in (("--max-steps", steps), ("--max-tokens", tokens), ("--max-time", time)):
            if value is not None and value <= 0:
                raise LmforgeError(f"{flag} must be positive, got {value} (leave it out for the default budget)")
        if steps is None and tokens is None and time is None:
            if epochs is not None and steps_per_epoch:
                if epochs <= 0:
                    raise LmforgeError(f"--train.epochs must be positive, got {epochs}")
                steps = max(1, math.ceil(epochs * steps_per_epoch))
            elif default_steps:
                steps = default_steps
            else:
                raise LmforgeError("give a budget: --max-steps, --max-tokens or --max-time")
        limits = [s for s in (steps, -(-tokens // tokens_per_step) if tokens and tokens_per_step else None) if s]
        return cls(steps, tokens, time, min(limits) if limits else None, train.warmup_steps)

    def steps_at_least(self, max_tokens_per_step: int) -> int | None:
        """A lower bound on the steps this budget runs: the horizon when known, else (a token budget whose steps
        hold at most `max_tokens_per_step` tokens, as SFT's padded batches do) the token budget in full steps;
        None when only time bounds the run. What the compile rule weighs (training/compile.py)."""
        if self.horizon is not None:
            return self.horizon
        if self.max_tokens:
            return math.ceil(self.max_tokens / max(1, max_tokens_per_step))
        return None

    def steps_done(self, step: int) -> bool:
        """The step (or fixed-token) budget is spent; the same on every rank of a data-parallel run."""
        return self.horizon is not None and step >= self.horizon

    def reason(self, step: int, tokens: int, seconds: float) -> str | None:
        """Why the run stops now, or None to go on."""
        if self.steps_done(step):
            return "budget (steps/tokens) reached"
        if self.max_tokens and tokens >= self.max_tokens:
            return "token budget reached"
        if self.max_time and seconds >= self.max_time:
            return f"time limit ({self.max_time:g}s) reached"
        return None

    def done(self, step: int, tokens: int, seconds: float) -> bool:
        return self.reason(step, tokens, seconds) is not None

    def progress(self, step: int, tokens: int, seconds: float) -> float:
        """Fraction of the schedule's decay spent before step `step` (lr_at clamps it to [0, 1])."""
        if self.horizon is not None:
            return step_progress(step, self.horizon, self.warmup_steps)
        if self.max_tokens:
            return tokens / self.max_tokens
        return seconds / self.max_time

    @property
    def unit(self) -> str:
        """What the progress bar counts: steps, tokens or seconds ("s")."""
        return "steps" if self.horizon is not None else "tokens" if self.max_tokens else "s"

    @property
    def total(self) -> float:
        return self.horizon if self.horizon is not None else self.max_tokens or self.max_time

    def position(self, step: int, tokens: int, seconds: float) -> float:
        """Where the run stands in the progress bar's unit."""
        return step if self.unit == "steps" else tokens if self.unit == "tokens" else seconds
