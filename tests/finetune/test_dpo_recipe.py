"""`lmforge finetune dpo` on a tiny random base: the first step's loss is log 2 (policy = reference), the
preference margin grows, LoRA uses the adapter-disabled base as reference, IPO runs, and resume is exact."""

import json
import math

import pytest

from lmforge.cli import main
from lmforge.finetune import runs
from tests.finetune.fixtures import tiny_base

FAST = ["--train.peak-flops", "1e12", "--train.dtype", "fp32", "--train.log-every", "1", "--batch-size", "4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("dbase") / "base", seed=1)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    f = tmp_path_factory.mktemp("pdata") / "prefs.jsonl"
    lines = []
    for i in range(40):
        q = f"What does function {i % 9} return?"
        good, bad = "It returns the sum.", "Split the string at the separator."
        if i % 3 == 0:
            lines.append({"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
                          "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}]})
        else:
            lines.append({"prompt": q, "chosen": good, "rejected": bad})
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return f


def _dpo(base, data, out, *extra):
    return main(["finetune", "dpo", "--base", str(base), "--data", str(data), "--out", str(out), *FAST, *extra])


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_prefers_chosen(base, prefs, tmp_path, lora):
    out = tmp_path / "dpo"
    extra = ["--lora", "--lora.rank", "8", "--lr", "1e-2"] if lora else ["--lr", "2e-3"]
    assert _dpo(base, prefs, out, "--max-steps", "12", "--eval-every", "6", "--beta", "0.5", *extra) == 0
    m = [r for r in _metrics(out) if "loss" in r]
    assert math.isclose(m[0]["loss"], math.log(2), abs_tol=2e-3)  # step 1: the policy is still the reference
    assert m[-1]["reward_margin"] > m[0]["reward_margin"] and m[-1]["loss"] < m[0]["loss"]
    s = json.loads((out / "summary.json").read_text())
    assert s["training"]["reference"] == ("adapters disabled" if lora else "precomputed log-probs")
    assert s["results"]["val_reward_margin_finetuned"] > 0
    assert (out / ("adapter" if lora else "final")).is_dir()


def test_ipo_and_resume(base, prefs, tmp_path, monkeypatch):
    a = tmp_path / "a"
    args = ["--max-steps", "6", "--loss", "ipo", "--beta", "0.5", "--lr", "2e-3", "--eval-every", "3"]
    assert _dpo(base, prefs, a, *args) == 0
    b = tmp_path / "b"
    real = runs.save_resumable

    def save_then_die(*x, **kw):
        real(*x, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "save_resumable", save_then_die)
    assert _dpo(base, prefs, b, *args, "--save-every", "3") == 130
    monkeypatch.setattr(runs, "save_resumable", real)
    assert _dpo(base, prefs, b, *args, "--save-every", "3") == 0
    assert [r.get("loss") for r in _metrics(b)] == [r.get("loss") for r in _metrics(a)]
    assert [r.get("val_loss") for r in _metrics(b)] == [r.get("val_loss") for r in _metrics(a)]


def test_small_file_gets_a_held_out_score_before_training(base, prefs, tmp_path, capsys):
    """Issue 13: with fewer than 20 pairs nothing was held out and "before training:" was an empty line."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(prefs.read_text().splitlines(keepends=True)[:10]))
    capsys.readouterr()
    assert _dpo(base, small, tmp_path / "d", "--max-steps", "1") == 0
    err = capsys.readouterr().err
    assert "9 train / 1 held-out pairs" in err and "before training: val_loss" in err
    assert _dpo(base, small, tmp_path / "e", "--max-steps", "1", "--val-fraction", "0") == 0
    before = [line for line in capsys.readouterr().err.splitlines() if line.startswith("before training:")]
    assert before == ["before training: nothing held out to score (give --val-data FILE, or a --val-fraction "
                      "above 0 with 2 or more records)"]
