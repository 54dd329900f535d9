"""Compiled pretraining (the default past the break-even): the same losses as eager, evaluation and sampling
still work (they run eagerly), the weights save and resume like an eager run's, and the cache is lmforge's."""

import json
import math

import pytest

from lmforge.pretrain.train import run
from lmforge.training.compile import cpu_compiler
from lmforge.training.metrics import read_metrics

from .conftest import tiny_config


@pytest.mark.skipif(cpu_compiler() is None, reason="Inductor needs a C++ compiler on CPU")
def test_compiled_pretraining_matches_eager(prepared, tmp_path, capsys, monkeypatch):
    """One compile (~30-60 s cold on 2 cores, a few seconds with lmforge's cache warm)."""
    losses = {}
    for flag in (False, True):
        out = tmp_path / f"compile-{flag}"
        assert run(tiny_config(prepared, out, compile=flag, max_steps=6, eval_every=3, save_every=3)) == 0
        losses[flag] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["results"]["final_val_loss"] > 0 and summary["samples"]
    assert "compiling the transformer blocks (--compile" in capsys.readouterr().err
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(losses[False], losses[True])), losses
    # auto: a 6-step run is far below the break-even, so it trains eagerly and says why
    monkeypatch.delenv("LMFORGE_COMPILE")  # (the suite's "never unless asked", tests/conftest.py)
    assert run(tiny_config(prepared, tmp_path / "auto", max_steps=6, save_every=0, eval_every=0)) == 0
    assert "training eagerly: 6 steps < the" in capsys.readouterr().err
