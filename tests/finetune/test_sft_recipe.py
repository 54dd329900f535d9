"""`lmforge finetune sft` end to end on a tiny random base: full and LoRA, resume equals an uninterrupted run,
outputs that load (final/ as a model, adapter/ as a PEFT adapter), and clear errors."""

import json
import os
import signal

import pytest
import torch

from lmforge import checkpoint
from lmforge.cli import main
from lmforge.data.sft import collate
from lmforge.finetune import sft
from tests.finetune.fixtures import tiny_base

FAST = ["--train.peak-flops", "1e12", "--train.dtype", "fp32", "--train.samples", "1", "--train.sample-tokens", "4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "qa.jsonl"
    lines = []
    for i in range(48):
        a, b = i % 7, i % 5
        lines.append({"prompt": f"What is {a} plus {b}?", "completion": f"It is {a + b}."} if i % 2 else
                     {"messages": [{"role": "user", "content": f"Say {a} {b}."},
                                   {"role": "assistant", "content": f"{a} {b}"}]})
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return f


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _sft(base, data, out, *extra):
    return main(["finetune", "sft", "--base", str(base), "--data", str(data), "--out", str(out), "--batch-size", "4",
                 "--lr", "3e-3", "--train.log-every", "1", *FAST, *extra])


def test_full_sft_learns_and_resumes_exactly(base, data, tmp_path, monkeypatch):
    a = tmp_path / "a"
    assert _sft(base, data, a, "--max-steps", "8", "--eval-every", "4") == 0
    ma = _metrics(a)
    losses = [r["loss"] for r in ma if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    summary = json.loads((a / "summary.json").read_text())
    res = summary["results"]
    assert res["val_loss_finetuned"] < res["val_loss_base"]
    assert summary["model"]["trainable_parameters"] == summary["model"]["parameters"]
    assert (a / "report.md").is_file() and (a / "config.yaml").is_file()
    model = checkpoint.load_model(a / "final")
    assert checkpoint.read_lineage(a / "final")["lineage"]["stage"] == "sft"
    assert not torch.equal(model.lm_head.weight, checkpoint.load_model(base).lm_head.weight)
    # the same command again has nothing to do; another config in the same directory is refused
    assert _sft(base, data, a, "--max-steps", "8", "--eval-every", "4") == 0
    assert _metrics(a) == ma
    assert _sft(base, data, a, "--max-steps", "9", "--eval-every", "4") == 2

    # Ctrl-C during step 5: the step finishes, a checkpoint is saved, exit 130; the same command resumes
    b = tmp_path / "b"
    calls = []

    def collate_then_interrupt(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return collate(*args, **kw)

    monkeypatch.setattr(sft, "collate", collate_then_interrupt)
    assert _sft(base, data, b, "--max-steps", "8", "--eval-every", "4") == 130
    monkeypatch.setattr(sft, "collate", collate)
    assert (b / "checkpoints" / "step-5").is_dir() and not (b / "final").exists()
    assert _sft(base, data, b, "--max-steps", "8", "--eval-every", "4") == 0
    mb = _metrics(b)
    assert [r["loss"] for r in mb if "loss" in r] == losses
    assert [r.get("val_loss") for r in mb] == [r.get("val_loss") for r in ma]
    assert torch.equal(checkpoint.load_model(b / "final").lm_head.weight, model.lm_head.weight)


def test_lora_sft_writes_peft_adapter_and_merged_final(base, data, tmp_path):
    out = tmp_path / "lora"
    assert _sft(base, data, out, "--max-steps", "4", "--lora", "--lora.rank", "4", "--lora.alpha", "8",
                "--lora.targets", "q,v", "--pack") == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["model"]["trainable_share"] < 0.05 and summary["data"]["packing"]
    base_model = checkpoint.load_model(base)
    merged = checkpoint.load_model(out / "final")
    adapted = checkpoint.load_adapter(checkpoint.load_model(base), out / "adapter")
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(ids) - adapted(ids)).abs().max() < 1e-4
        assert (merged(ids) - base_model(ids)).abs().max() > 1e-6
    # only the adapted projections changed
    sb, sm = base_model.state_dict(), merged.state_dict()
    changed = {k for k in sb if not torch.equal(sb[k], sm[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)

    # lmforge merge gives the same directory contents as final/
    assert main(["merge", "--base", str(base), "--adapter", str(out / "adapter"), "--out", str(tmp_path / "m")]) == 0
    with torch.no_grad():
        assert torch.allclose(checkpoint.load_model(tmp_path / "m")(ids), merged(ids), atol=1e-6)


def test_builtin_data_and_errors(base, data, tmp_path, capsys):
    out = tmp_path / "builtin"
    assert _sft(base, "builtin", out, "--max-steps", "2", "--heldout-mc", "4", "--val-max", "16") == 0
    res = json.loads((out / "summary.json").read_text())["results"]
    assert {"val_loss_base", "mc_acc_base", "mc_acc_finetuned"} <= set(res)
    qa = [json.loads(x) for x in (out / "data" / "heldout-qa.jsonl").read_text().splitlines()]
    assert qa and set(qa[0]) == {"prompt", "answer"}

    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + "{oops\n")
    capsys.readouterr()
    assert _sft(base, bad, tmp_path / "x", "--max-steps", "1") == 2
    assert "bad.jsonl line 49: not valid JSON" in capsys.readouterr().err
    assert _sft(base, bad, tmp_path / "y", "--max-steps", "1", "--skip-bad") == 0
    assert json.loads((tmp_path / "y" / "summary.json").read_text())["data"]["skipped_bad"] == 1
    assert _sft(tmp_path / "lora-missing", data, tmp_path / "z", "--max-steps", "1") == 2
    assert "does not exist" in capsys.readouterr().err


def test_val_fraction_holds_out_from_a_small_file(base, data, tmp_path, capsys):
    """Issue 13: below 20 records --val-fraction was silently ignored; now at least one record is held out."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(data.read_text().splitlines(keepends=True)[:10]))
    capsys.readouterr()
    assert _sft(base, small, tmp_path / "s", "--max-steps", "1") == 0
    err = capsys.readouterr().err
    assert "10 records -> 9 train / 1 validation examples" in err
    res = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert res["data"]["validation_examples"] == 1 and res["results"]["val_loss_base"] > 0
    assert _sft(base, small, tmp_path / "t", "--max-steps", "1", "--val-fraction", "0.3") == 0
    assert "10 records -> 7 train / 3 validation examples" in capsys.readouterr().err
