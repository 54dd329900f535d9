"""Logits processors and the draw, as pure functions."""

import random

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.inference.sampling import (
    PenaltyState,
    SamplingParams,
    apply_penalties,
    draw,
    filter_probs,
    sample,
)


def test_temperature_zero_is_argmax_and_never_draws():
    logits = torch.randn(3, 50)

    class NoDraw(random.Random):
        def random(self):
            raise AssertionError("greedy rows must not consume randomness")

    ids = sample(logits, [SamplingParams(temperature=0.0)] * 3, [NoDraw()] * 3, [None] * 3)
    assert ids.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 1e-300, 5e-324, 1e-6])
def test_tiny_temperatures_are_greedy(temperature):
    """logits / 1e-39 overflowed float32 to inf, softmax made NaN, and the draw returned the last id every step."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 5
    logits[:, -1] = logits.min() - 1  # the last id is never the answer

    class NoDraw(random.Random):
        def random(self):
            raise AssertionError("a greedy row must not consume randomness")

    params = [SamplingParams(temperature=temperature, seed=1)] * 4
    ids = sample(logits, params, [NoDraw()] * 4, [None] * 4)
    assert ids.tolist() == logits.argmax(-1).tolist()


def test_small_temperature_above_greedy_is_stable():
    """Just above the greedy threshold the tempered softmax stays finite and puts its mass on the argmax."""
    logits = torch.tensor([[30.0, 29.0, -5.0, 1e4 / 3], [0.0, 0.1, 0.2, 0.3]])
    probs = filter_probs(logits, [SamplingParams(temperature=2e-5)] * 2)
    assert torch.isfinite(probs).all()
    assert probs.argmax(-1).tolist() == [3, 3] and (probs.max(-1).values > 0.999).all()
    ids = sample(logits, [SamplingParams(temperature=2e-5)] * 2, [random.Random(0)] * 2, [None] * 2)
    assert ids.tolist() == [3, 3]


def test_top_k_top_p_min_p_supports():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3))
    ps = [SamplingParams(top_k=2), SamplingParams(top_p=0.8), SamplingParams(min_p=0.25)]
    probs = filter_probs(logits, ps)
    assert (probs > 0).tolist() == [[True, True, False, False, False],  # top-2
                                    [True, True, True, False, False],  # 0.5+0.2 < 0.8, so 0.15 is needed
                                    [True, True, True, False, False]]  # >= 0.25 * 0.5
    # rows without filters keep every token, even when others in the batch sort
    mixed = filter_probs(logits[:2], [SamplingParams(top_k=1), SamplingParams()])
    assert (mixed[1] > 0).all() and (mixed[0] > 0).sum() == 1


def test_draw_follows_the_distribution_and_skips_zeros():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]])
    rng = random.Random(0)
    counts = torch.zeros(5)
    for _ in range(2000):
        counts[draw(probs, [rng.random()])] += 1
    assert counts[0] == counts[2] == counts[4] == 0
    assert abs(counts[3] / 2000 - 0.75) < 0.04
    assert draw(probs, [0.0]).item() == 1 and draw(probs, [0.999999]).item() == 3


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    st = PenaltyState(4, prompt_ids=[0, 1])
    st.update(2)
    st.update(2)
    out = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)], [st])
    assert out.tolist() == [[1.0, -4.0, 0.5, 0.5]]  # seen (prompt + output) ids: positive /2, negative *2
    out = apply_penalties(logits, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], [st])
    assert out.tolist() == [[2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5]]  # only generated ids, by count
    greedy = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    assert sample(logits, [greedy], [random.Random(0)], [st]).item() == 0
    st2 = PenaltyState(4, [])
    for _ in range(3):
        st2.update(0)
    assert sample(logits, [greedy], [random.Random(0)], [st2]).item() == 2  # 2.0 - 6.0 loses to 1.0


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2.0),
                                         ("max_tokens", -1), ("presence_penalty", 3.0), ("top_logprobs", 50),
                                         ("repetition_penalty", 0.0)])
def test_out_of_range_values_are_named(field, value):
    with pytest.raises(LmforgeError, match=field):
        SamplingParams(**{field: value}).validate()
