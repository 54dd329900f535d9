"""Budget: every combination of --max-steps / --max-tokens / --max-time, with fixed tokens per step (token shards:
pretrain, cpt) and varying ones (SFT, DPO), and the no-limit fallbacks (epochs, a default, an error), in one table."""

import dataclasses

import pytest

from lmforge.errors import LmforgeError
from lmforge.training.budget import Budget
from lmforge.training.config import TrainConfig

FIXED, VARYING = 100, None  # tokens per step

# given (max_steps, max_tokens, max_time), tokens per step, fallback -> horizon, unit, total, and checks at
# (step, tokens, seconds): done?, progress (None: not checked)
ROWS = [
    # fixed tokens per step: tokens convert to steps, the schedule spans the first limit
    ("steps", (10, None, None), FIXED, {}, 10, "steps", 10, [((9, 900, 0), False, 0.9), ((10, 1000, 0), True, 1.0)]),
    ("tokens", (None, 550, None), FIXED, {}, 6, "steps", 6, [((5, 500, 0), False, 5 / 6), ((6, 600, 0), True, 1.0)]),
    ("time", (None, None, 30.0), FIXED, {}, None, "s", 30.0, [((99, 9900, 15.0), False, 0.5),
                                                              ((99, 9900, 30.0), True, 1.0)]),
    ("steps+tokens: tokens first", (10, 550, None), FIXED, {}, 6, "steps", 6, [((6, 600, 0), True, 1.0)]),
    ("steps+tokens: steps first", (4, 550, None), FIXED, {}, 4, "steps", 4, [((3, 300, 0), False, 0.75),
                                                                             ((4, 400, 0), True, 1.0)]),
    ("steps+time", (10, None, 30.0), FIXED, {}, 10, "steps", 10, [((3, 300, 29.0), False, 0.3),
                                                                  ((3, 300, 30.0), True, 0.3)]),
    ("tokens+time", (None, 550, 30.0), FIXED, {}, 6, "steps", 6, [((2, 200, 30.0), True, 2 / 6)]),
    ("all three", (10, 550, 30.0), FIXED, {}, 6, "steps", 6, [((5, 500, 29.0), False, 5 / 6),
                                                              ((6, 600, 0), True, 1.0)]),
    ("none: default steps", (None, None, None), FIXED, {"default_steps": 500}, 500, "steps", 500,
     [((499, 0, 0), False, None), ((500, 0, 0), True, 1.0)]),
    ("none: epochs before default", (None, None, None), FIXED,
     {"epochs": 2.0, "steps_per_epoch": 5, "default_steps": 500}, 10, "steps", 10, [((10, 0, 0), True, 1.0)]),
    # varying tokens per step: tokens stop the run but cannot be converted to steps in advance
    ("varying: steps", (10, None, None), VARYING, {}, 10, "steps", 10, [((5, 10**9, 0), False, 0.5)]),
    ("varying: tokens", (None, 1000, None), VARYING, {}, None, "tokens", 1000,
     [((3, 999, 0), False, 0.999), ((3, 1000, 0), True, 1.0)]),
    ("varying: time", (None, None, 30.0), VARYING, {}, None, "s", 30.0, [((3, 50, 15.0), False, 0.5)]),
    ("varying: steps+tokens", (10, 1000, None), VARYING, {}, 10, "steps", 10,
     [((3, 999, 0), False, 0.3), ((3, 1000, 0), True, 0.3)]),
    ("varying: tokens+time", (None, 1000, 30.0), VARYING, {}, None, "tokens", 1000,
     [((3, 500, 29.0), False, 0.5), ((3, 500, 30.0), True, 0.5)]),
    ("varying: steps+time", (10, None, 30.0), VARYING, {}, 10, "steps", 10, [((2, 9, 30.0), True, 0.2)]),
    ("varying: all three", (10, 1000, 30.0), VARYING, {}, 10, "steps", 10, [((9, 999, 29.9), False, 0.9)]),
    ("varying: none, epochs", (None, None, None), VARYING, {"epochs": 1.5, "steps_per_epoch": 3}, 5, "steps", 5,
     [((4, 0, 0), False, 0.8), ((5, 0, 0), True, 1.0)]),
    ("varying: none, a sliver of an epoch", (None, None, None), VARYING, {"epochs": 0.01, "steps_per_epoch": 3},
     1, "steps", 1, [((1, 0, 0), True, 1.0)]),
]


def _train(limits, warmup=0):
    steps, tokens, time = limits
    return dataclasses.replace(TrainConfig(), max_steps=steps, max_tokens=tokens, max_time=time, warmup_steps=warmup)


@pytest.mark.parametrize("name, limits, per_step, fallback, horizon, unit, total, checks", ROWS,
                         ids=[r[0] for r in ROWS])
def test_budget_table(name, limits, per_step, fallback, horizon, unit, total, checks):
    b = Budget.resolve(_train(limits), tokens_per_step=per_step, **fallback)
    assert (b.horizon, b.unit, b.total) == (horizon, unit, total)
    for (step, tokens, seconds), done, progress in checks:
        assert b.done(step, tokens, seconds) is done, (step, tokens, seconds)
        assert (b.reason(step, tokens, seconds) is not None) is done
        if progress is not None:
            assert b.progress(step, tokens, seconds) == pytest.approx(progress)
        assert b.position(step, tokens, seconds) == {"steps": step, "tokens": tokens, "s": seconds}[unit]


def test_warmup_steps_are_outside_the_decay_and_reasons_say_why():
    b = Budget.resolve(_train((110, None, 60.0), warmup=10))
    assert b.progress(10, 0, 0) == 0 and b.progress(60, 0, 0) == pytest.approx(0.5)
    assert b.reason(110, 0, 0) == "budget (steps/tokens) reached"
    assert b.reason(5, 0, 60.0) == "time limit (60s) reached"
    assert Budget.resolve(_train((None, 10, None))).reason(1, 10, 0) == "token budget reached"
    assert b.steps_done(110) and not b.steps_done(109)  # the rank-independent part (the clock is not)


@pytest.mark.parametrize("limits, fallback, match", [
    ((None, None, None), {}, "give a budget"),
    ((None, None, None), {"epochs": 0.0, "steps_per_epoch": 4}, "epochs must be positive"),
    ((0, None, None), {"default_steps": 500}, "--max-steps must be positive"),
    ((None, -5, None), {}, "--max-tokens must be positive"),
    ((None, None, 0.0), {}, "--max-time must be positive"),
], ids=["nothing", "zero epochs", "zero steps", "negative tokens", "zero time"])
def test_budget_errors(limits, fallback, match):
    with pytest.raises(LmforgeError, match=match):
        Budget.resolve(_train(limits), tokens_per_step=FIXED, **fallback)


def test_steps_at_least_is_what_the_compile_rule_weighs():
    def budget(steps=None, tokens=None, time=None, per_step=None):
        return Budget.resolve(TrainConfig(max_steps=steps, max_tokens=tokens, max_time=time, warmup_steps=0),
                              tokens_per_step=per_step)
    assert budget(steps=40).steps_at_least(512) == 40
    assert budget(tokens=1000).steps_at_least(512) == 2  # varying steps of at most 512 tokens: at least 2
    assert budget(tokens=1000, per_step=100).steps_at_least(512) == 10  # fixed steps: the horizon itself
    assert budget(time=60.0).steps_at_least(512) is None
