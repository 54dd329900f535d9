"""When training compiles (the break-even rule), where the compile cache lives, and that a compiled LoRA DPO run
(policy graph, adapter-disabled reference graph, batches of varying length) trains like the eager one."""

import json
import math
import os

import pytest
import torch

from lmforge.cli import main
from lmforge.training.compile import (
    BREAK_EVEN_SECONDS,
    BREAK_EVEN_STEPS,
    cpu_compiler,
    decide,
    training_cache,
)
from tests.finetune.fixtures import one_thread, tiny_base  # noqa: F401  (one_thread: autouse)

CPU = torch.device("cpu")


def test_the_flag_wins_and_auto_weighs_the_budget(monkeypatch):
    monkeypatch.delenv("LMFORGE_COMPILE")  # the suite's "never unless asked" (tests/conftest.py), checked below
    n = BREAK_EVEN_STEPS["cpu"]
    assert decide(True, CPU, 3) == (True, "--compile")
    assert decide(False, CPU, 10 * n) == (False, "--no-compile")
    assert decide(None, CPU, n)[0] and not decide(None, CPU, n - 1)[0]
    assert "break-even" in decide(None, CPU, n - 1)[1]
    # a time budget alone: compiled when it is longer than the break-even time; no budget at all: eager
    assert decide(None, CPU, None, BREAK_EVEN_SECONDS["cpu"])[0]
    assert not decide(None, CPU, None, BREAK_EVEN_SECONDS["cpu"] / 2)[0]
    assert not decide(None, CPU, None, None)[0]
    assert decide(None, torch.device("cuda"), BREAK_EVEN_STEPS["cuda"])[0]
    monkeypatch.setenv("LMFORGE_COMPILE", "0")
    assert decide(None, CPU, 10 * n) == (False, "LMFORGE_COMPILE=0") and decide(True, CPU, 1)[0]
    monkeypatch.setenv("LMFORGE_COMPILE", "1")
    assert decide(None, CPU, 1)[0]


def test_training_compiles_into_lmforges_cache_unless_torch_is_told_otherwise(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_COMPILE_CACHE", str(tmp_path / "cc"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    d = training_cache(CPU, dynamic=True)
    assert d.is_dir() and d.is_relative_to(tmp_path / "cc") and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(d)
    key = json.loads((d / "key.json").read_text())
    assert key["kind"] == "train" and key["device"] == "cpu" and key["dynamic"] is True
    assert training_cache(CPU, dynamic=False) != d  # static and dynamic graphs live apart
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own choice is kept
    assert training_cache(CPU, dynamic=True) == tmp_path / "mine"


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.skipif(cpu_compiler() is None, reason="Inductor needs a C++ compiler on CPU")
def test_compiled_lora_dpo_trains_like_eager(tmp_path):
    """One compile (the slow part of this suite: ~30 s cold on 2 cores, seconds with a warm cache)."""
    base = tiny_base(tmp_path / "base", seed=1)
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"What does function {i} return?" + " Please." * (i % 4), "chosen": "It returns the sum.",
             "rejected": "Split the string" + " at the separator" * (i % 3) + "."} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / flag
        assert main(["finetune", "dpo", "--base", str(base), "--data", str(data), "--out", str(out), flag,
                     "--lora", "--lora.rank", "4", "--lr", "1e-2", "--max-steps", "4", "--batch-size", "4",
                     "--eval-every", "0", "--heldout-mc", "0", "--train.peak-flops", "1e12",
                     "--train.dtype", "bf16", "--train.log-every", "1"]) == 0
        losses[flag] = _losses(out)
    eager, compiled = losses["--no-compile"], losses["--compile"]
    assert math.isclose(compiled[0], math.log(2), abs_tol=2e-3)  # policy graph == reference graph at step 1
    assert len(compiled) == len(eager) == 4
    assert all(math.isclose(a, b, rel_tol=2e-2, abs_tol=2e-2) for a, b in zip(eager, compiled)), (eager, compiled)


@pytest.mark.skipif(cpu_compiler() is None, reason="Inductor needs a C++ compiler on CPU")
def test_compiled_lora_kto_trains_like_eager(tmp_path):
    """The policy, KL and adapter-disabled reference passes compiled; evaluation stays eager (its own shapes)."""
    base = tiny_base(tmp_path / "base", seed=1)
    data = tmp_path / "ratings.jsonl"
    rows = [{"prompt": f"What does function {i} return?" + " Please." * (i % 4), "label": bool(i % 2),
             "completion": "It returns the sum." if i % 2 else "Split the string" + " at it" * (i % 3) + "."}
            for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses, logs = {}, {}
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / flag
        assert main(["finetune", "kto", "--base", str(base), "--data", str(data), "--out", str(out), flag,
                     "--lora", "--lora.rank", "4", "--lr", "1e-2", "--max-steps", "4", "--batch-size", "4",
                     "--eval-every", "2", "--val-fraction", "0.25", "--train.peak-flops", "1e12", "--train.dtype", "bf16",
                     "--train.log-every", "1"]) == 0
        losses[flag] = _losses(out)
        logs[flag] = json.loads((out / "summary.json").read_text())["results"]
    eager, compiled = losses["--no-compile"], losses["--compile"]
    assert math.isclose(compiled[0], 0.5, abs_tol=2e-3)  # policy graph == reference graph at step 1
    assert len(compiled) == len(eager) == 4
    assert all(math.isclose(a, b, rel_tol=2e-2, abs_tol=2e-2) for a, b in zip(eager, compiled)), (eager, compiled)
    a, b = logs["--no-compile"]["val_loss_finetuned"], logs["--compile"]["val_loss_finetuned"]
    assert math.isclose(a, b, rel_tol=2e-2, abs_tol=2e-2), (a, b)


def test_wide_models_train_eagerly_on_a_cpu_with_lmforges_kernels(monkeypatch):
    """From CPU_COMPILE_MAX_WIDTH up, compiled blocks are no faster than the eager kernels: auto stays eager
    whatever the budget (the flag and LMFORGE_COMPILE still win); narrower models, other devices and CPUs without
    the kernels keep the break-even rule."""
    from lmforge.model import cpu_kernels
    from lmforge.training.compile import CPU_COMPILE_MAX_WIDTH

    monkeypatch.delenv("LMFORGE_COMPILE")
    n, wide = 10 * BREAK_EVEN_STEPS["cpu"], CPU_COMPILE_MAX_WIDTH
    monkeypatch.setattr(cpu_kernels, "available", lambda: True)
    want, why = decide(None, CPU, n, width=wide)
    assert not want and "eagerly" in why
    assert decide(None, CPU, n, width=wide // 2)[0]
    assert decide(True, CPU, n, width=wide)[0]
    assert decide(None, torch.device("cuda"), n, width=wide)[0]
    monkeypatch.setenv("LMFORGE_COMPILE", "1")
    assert decide(None, CPU, n, width=wide)[0]
    monkeypatch.delenv("LMFORGE_COMPILE")
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert decide(None, CPU, n, width=wide)[0]
