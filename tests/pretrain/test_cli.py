"""The pretrain/prepare command lines: preset, YAML, dotted overrides and the short flags resolve as DESIGN says."""

import pytest

from lmforge.cli import main
from lmforge.config import parse_config
from lmforge.errors import LmforgeError
from lmforge.pretrain.prepare import PrepareConfig
from lmforge.pretrain.train import PretrainConfig


def test_preset_yaml_and_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("preset: small\nmodel:\n  n_layers: 3\ntrain:\n  lr: 0.001\n  max_steps: 50\nout: runs/y\n")
    cfg = parse_config(PretrainConfig, ["--config", str(y), "--max-steps", "7", "--max-tokens", "1e6", "--max-time",
                                        "30", "--batch-size", "3", "--grad-accum", "2", "--seq-len", "128",
                                        "--seed", "5", "--eval-every", "9", "--save-every", "11",
                                        "--model.hidden_size", "384"])
    assert cfg.preset == "small" and cfg.model.n_kv_heads == 4  # from the preset
    assert cfg.model.n_layers == 3 and cfg.model.hidden_size == 384  # YAML, then flag
    t = cfg.train
    assert (t.lr, t.max_steps, t.max_tokens, t.max_time) == (0.001, 7, 1_000_000, 30.0)
    assert (t.batch_size, t.grad_accum, t.seq_len, t.seed, t.eval_every, t.save_every) == (3, 2, 128, 5, 9, 11)
    assert cfg.out == "runs/y"
    assert parse_config(PretrainConfig, ["--lr", "0.01"]).train.lr == 0.01
    assert parse_config(PretrainConfig, ["--resume"]).train.resume is True
    assert parse_config(PretrainConfig, ["--no-resume"]).train.resume is False
    with pytest.raises(LmforgeError, match="unknown config key"):
        y.write_text("train:\n  learning_rate: 1\n")
        parse_config(PretrainConfig, ["--config", str(y)])


def test_prepare_flags():
    cfg = parse_config(PrepareConfig, ["--corpus", "a.txt", "--corpus", "docs/", "--vocab-size", "1000",
                                       "--tokenizer", "tok", "--out", "d"])
    assert cfg.corpus == ["a.txt", "docs/"] and cfg.vocab_size == 1000 and cfg.tokenizer == "tok"
    assert parse_config(PrepareConfig, []).corpus == ["default"]


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "lmforge prepare" in err and "Traceback" not in err
