"""`lmforge finetune kto` on a tiny random base: the first step's loss is 0.5 (policy = reference, z0 = 0),
desirable completions pull ahead of undesirable ones on held-out records, the KL estimate is per step (grad
accumulation does not change the update), full and LoRA, resume is exact, and bad input says what to do."""

import json
import math

import pytest

from lmforge.cli import main
from lmforge.data.preference import load_unpaired
from lmforge.finetune import runs
from tests.finetune.fixtures import tiny_base, tiny_tokenizer

FAST = ["--train.peak-flops", "1e12", "--train.dtype", "fp32", "--train.log-every", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("kbase") / "base", seed=2)


@pytest.fixture(scope="module")
def ratings(tmp_path_factory):
    f = tmp_path_factory.mktemp("kdata") / "ratings.jsonl"
    lines = []
    for i in range(40):
        q = f"What does function {i % 9} return?"
        good, bad = "It returns the sum.", "Split the string at the separator."
        lines.append({"prompt": [{"role": "user", "content": q}] if i % 4 == 0 else q,
                      "completion": good if i % 2 else [{"role": "assistant", "content": bad}],
                      "label": bool(i % 2)})
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return f


def _kto(base, data, out, *extra):
    return main(["finetune", "kto", "--base", str(base), "--data", str(data), "--out", str(out), *FAST, *extra])


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_kto_prefers_desirable(base, ratings, tmp_path, lora):
    out = tmp_path / "kto"
    extra = ["--lora", "--lora.rank", "8", "--lr", "1e-2"] if lora else ["--lr", "2e-3"]
    assert _kto(base, ratings, out, "--max-steps", "10", "--eval-every", "5", "--beta", "0.5", "--batch-size", "4",
                "--val-fraction", "0.2", *extra) == 0
    m = [r for r in _metrics(out) if "loss" in r]
    assert math.isclose(m[0]["loss"], 0.5, abs_tol=2e-3) and m[0]["kl"] == 0.0  # step 1: policy = reference
    assert m[-1]["loss"] < m[0]["loss"] and m[-1]["reward_margin"] > 0
    s = json.loads((out / "summary.json").read_text())
    assert s["training"]["reference"] == ("adapters disabled" if lora else "precomputed log-probs")
    assert s["results"]["val_reward_margin_base"] == 0.0 and s["results"]["val_reward_margin_finetuned"] > 0
    assert s["results"]["val_loss_finetuned"] < s["results"]["val_loss_base"]
    assert s["data"]["desirable"] + s["data"]["undesirable"] == 32
    assert (out / ("adapter" if lora else "final")).is_dir()


def test_accumulation_and_resume_are_exact(base, ratings, tmp_path, monkeypatch):
    args = ["--max-steps", "6", "--beta", "0.5", "--lora", "--lora.rank", "4", "--lr", "5e-3", "--eval-every", "3"]
    a = tmp_path / "a"
    assert _kto(base, ratings, a, *args, "--batch-size", "4") == 0
    # one micro-batch of 4 or two of 2: the same records per step, the same z0, the same losses
    c = tmp_path / "c"
    assert _kto(base, ratings, c, *args, "--batch-size", "2", "--train.grad-accum", "2") == 0
    la, lc = [r["loss"] for r in _metrics(a)], [r["loss"] for r in _metrics(c)]
    assert lc == pytest.approx(la, rel=1e-4)
    b = tmp_path / "b"
    real = runs.save_resumable

    def save_then_die(*x, **kw):
        real(*x, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "save_resumable", save_then_die)
    assert _kto(base, ratings, b, *args, "--batch-size", "4", "--save-every", "3") == 130
    monkeypatch.setattr(runs, "save_resumable", real)
    assert _kto(base, ratings, b, *args, "--batch-size", "4", "--save-every", "3") == 0
    assert [r.get("loss") for r in _metrics(b)] == [r.get("loss") for r in _metrics(a)]
    assert [r.get("val_loss") for r in _metrics(b)] == [r.get("val_loss") for r in _metrics(a)]


def test_bad_input(base, ratings, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "completion": "a", "label": "yes"}) + "\n")
    assert _kto(base, bad, tmp_path / "x", "--max-steps", "1") == 2
    assert "line 1" in capsys.readouterr().err
    assert _kto(base, ratings, tmp_path / "y", "--max-steps", "1", "--batch-size", "1") == 2
    assert "two or more records per step" in capsys.readouterr().err
    items, stats = load_unpaired(ratings, tiny_tokenizer(), 64)
    assert len(items) == 40 and sum(x.desirable for x in items) == 20 and stats.records == 40
