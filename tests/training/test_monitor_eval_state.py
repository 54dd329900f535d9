"""MFU accounting, the measured peak and thread choice, precision policy, evaluation/bpb, sampling, RNG state."""

import math
import random

import numpy as np
import pytest
import torch

from lmforge.data import IGNORE_INDEX
from lmforge.model.accounting import flops_per_token_train
from lmforge.model.config import preset
from lmforge.model.transformer import Transformer
from lmforge.training.evaluate import bits_per_byte, evaluate, sample
from lmforge.training.monitor import Throughput, fastest_thread_count, measure_peak_flops
from lmforge.training.precision import resolve_dtype
from lmforge.training.state import rng_state, seed_everything, set_rng_state


def test_throughput_and_mfu():
    cfg = preset("tiny")
    fpt = flops_per_token_train(cfg, 256)
    m = Throughput(fpt, peak_flops=1e12, world_size=2)
    m.add(4096, 2.0)
    m.add(4096, 2.0)
    r = m.rate()
    assert r["tokens_per_s"] == 2048 and r["mfu"] == pytest.approx(1024 * fpt / 1e12)
    assert m.flops_total == 8192 * fpt and m.rate()["tokens_per_s"] == 0.0
    assert Throughput(fpt, None).mfu(100.0) is None


def test_measured_peak_and_threads_leave_state_alone():
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, size=128, seconds=0.05)
    assert 1e8 < peak < 1e15
    assert fastest_thread_count(seconds=0.02) in (1, threads)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)


def test_precision_policy():
    assert resolve_dtype("fp32", torch.device("cpu")) is None
    auto = resolve_dtype("auto", torch.device("cpu"))
    assert auto in (None, torch.bfloat16)


def test_evaluate_bpb_and_ignored_targets():
    torch.manual_seed(0)
    m = Transformer(preset("test"))
    m.init_weights(0)
    x = torch.randint(0, 2048, (2, 16))
    y = torch.randint(0, 2048, (2, 16))
    full = evaluate(m, [(x, y)], tokens_per_byte=0.5)
    y2 = y.clone()
    y2[1] = IGNORE_INDEX  # a padding row adds nothing
    half = evaluate(m, [(x, y2), (x[:1], y[:1])])
    assert full["tokens"] == 32 and half["tokens"] == 32
    assert abs(full["loss"] - math.log(2048)) < 0.5 and full["ppl"] == pytest.approx(math.exp(full["loss"]))
    assert full["bpb"] == pytest.approx(bits_per_byte(full["loss"], 0.5)) == pytest.approx(full["loss"] * 0.5 / math.log(2))
    assert m.training  # put back in training mode


def test_sample_is_seeded_private_and_greedy_matches_argmax():
    torch.manual_seed(0)
    m = Transformer(preset("test"))
    m.init_weights(0)
    before = torch.get_rng_state()
    a = sample(m, [1, 2, 3], 8, temperature=1.0, seed=7)
    assert a == sample(m, [1, 2, 3], 8, temperature=1.0, seed=7) and len(a) == 8
    assert torch.equal(torch.get_rng_state(), before)  # the training RNG stream is untouched
    greedy = sample(m, [1, 2, 3], 4, temperature=0)
    ids = [1, 2, 3]
    for _ in range(4):
        ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[3:]
    assert sample(m, [1, 2, 3], 4, temperature=0, stop_ids=[greedy[1]]) == greedy[:1]


def test_rng_state_round_trip():
    seed_everything(3)
    state = rng_state()
    a = (torch.rand(3), np.random.rand(), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
