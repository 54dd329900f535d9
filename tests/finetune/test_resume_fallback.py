"""Every finetuning recipe, full and LoRA, resumes past a damaged newest checkpoint: it says so, continues from the
next older one, and ends exactly where an uninterrupted run ends (pretrain's own test is in tests/pretrain)."""

import json
import shutil

import pytest
import torch

from lmforge import checkpoint
from lmforge.cli import main
from tests.finetune.fixtures import TEXT, tiny_base

COMMON = ["--train.peak-flops", "1e12", "--train.dtype", "fp32", "--train.log-every", "1", "--batch-size", "4",
          "--max-steps", "4", "--save-every", "1", "--train.keep-last", "3", "--eval-every", "0",
          "--train.samples", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fallback")
    base = tiny_base(root / "base", seed=3)
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"What is {i % 7} plus {i % 5}?",
                                       "completion": f"It is {i % 7 + i % 5}."}) + "\n" for i in range(24)))
    prefs = root / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"What does function {i % 9} return?", "chosen": "The sum.",
                                         "rejected": "Split the string."}) + "\n" for i in range(24)))
    corpus = root / "domain.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{TEXT[i % 4]} ({i})"}) + "\n" for i in range(120)))
    shards = root / "shards"
    assert main(["prepare", "--corpus", str(corpus), "--tokenizer", str(base), "--out", str(shards),
                 "--val-fraction", "0.1"]) == 0
    return {"base": base, "sft": sft, "dpo": prefs, "cpt": shards, "root": root}


def _run(setup, recipe, lora, out):
    extra = {"sft": ["--lr", "3e-3"], "dpo": ["--lr", "2e-3"],
             "cpt": ["--seq-len", "32", "--lr", "3e-3", "--train.eval-tokens", "256"]}[recipe]
    if lora:
        extra += ["--lora", "--lora.rank", "4"]
    return main(["finetune", recipe, "--base", str(setup["base"]), "--data", str(setup[recipe]), "--out", str(out),
                 *COMMON, *extra])


def _losses(run):
    return [json.loads(x).get("loss") for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("recipe", ["sft", "dpo", "cpt"])
def test_damaged_newest_checkpoint_falls_back(setup, recipe, lora, tmp_path, capsys):
    whole = tmp_path / "whole"
    assert _run(setup, recipe, lora, whole) == 0
    assert sorted(d.name for d in (whole / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]

    # a run killed after step 3, whose newest checkpoint is then damaged on disk
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copytree(whole / "checkpoints", broken / "checkpoints")
    shutil.copy(whole / "metrics.jsonl", broken / "metrics.jsonl")
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    (broken / "checkpoints" / "step-3" / weights).write_bytes(b"truncated")
    capsys.readouterr()
    assert _run(setup, recipe, lora, broken) == 0
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "step-3" in err and "resuming from step 2" in err
    assert _losses(broken) == _losses(whole)  # exact: the older checkpoint resumes like the uninterrupted run
    a, b = checkpoint.load_model(whole / "final").state_dict(), checkpoint.load_model(broken / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # every checkpoint damaged: an error, not a silent start from the base
    for d in (broken / "checkpoints").iterdir():
        (d / "trainer_state" / "state.pt").write_bytes(b"junk")
    for name in ("summary.json", "final", "adapter"):
        p = broken / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    assert _run(setup, recipe, lora, broken) == 2
    assert "could be loaded" in capsys.readouterr().err
