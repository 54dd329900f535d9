"""The dataclass <-> YAML/argparse bridge: order of precedence, strict keys, presets, types."""

from dataclasses import dataclass, field

import pytest

from lmforge.config import load_yaml, opt, parse_config, save_config
from lmforge.errors import LmforgeError
from lmforge.model.config import PRESETS, ModelConfig


@dataclass
class Train:
    max_steps: int = opt(100, "steps", flag="--max-steps")
    lr: float = opt(3e-4, "learning rate", flag="--lr")
    compile: bool = opt(False, "torch.compile")


@dataclass
class Cfg:
    preset: str = opt("test", "model preset", preset_for="model", presets=PRESETS)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: Train = field(default_factory=Train)
    out: str = opt("runs/x", "output")
    tags: list[str] = opt(default_factory=list, help="repeatable")


def test_defaults_and_preset():
    cfg = parse_config(Cfg, [])
    assert cfg.model.hidden_size == PRESETS["test"].hidden_size
    assert cfg.train.max_steps == 100


def test_precedence_yaml_then_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("preset: tiny\ntrain:\n  max_steps: 7\n  lr: 1e-3\nmodel:\n  n_layers: 3\n")
    cfg = parse_config(Cfg, ["--config", str(y), "--max-steps", "9", "--model.hidden_size", "96", "--tags", "a",
                             "--tags", "b", "--train.compile"])
    assert cfg.model.vocab_size == PRESETS["tiny"].vocab_size  # preset from YAML
    assert cfg.model.n_layers == 3 and cfg.model.hidden_size == 96  # YAML, then flag, over the preset
    assert cfg.train.max_steps == 9 and cfg.train.lr == 1e-3 and cfg.train.compile is True
    assert cfg.tags == ["a", "b"]
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_yaml(tmp_path / "resolved.yaml")["train"]["max_steps"] == 9


def test_unknown_yaml_key_is_an_error(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  max_stepz: 7\n")
    with pytest.raises(LmforgeError, match="unknown config key 'train.max_stepz'"):
        parse_config(Cfg, ["--config", str(y)])


def test_unknown_flag_exits(capsys):
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--max-stepz", "3"])


def test_bad_value_and_preset():
    with pytest.raises(LmforgeError, match="cannot read 'x' as int"):
        parse_config(Cfg, ["--max-steps", "x"])
    with pytest.raises(LmforgeError, match="unknown preset 'huge'"):
        parse_config(Cfg, ["--preset", "huge"])


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--help"])
    out = capsys.readouterr().out
    assert "--max-steps" in out and "(default: 100)" in out


@dataclass
class Sampling:
    temperature: float = opt(1.0, "temperature", flag="--temperature")


@dataclass
class Verb:
    dtype: str = opt("float32", "dtype", choices=["float32", "bfloat16"])
    sampling: Sampling = opt(default_factory=lambda: Sampling(temperature=0.7))


def test_help_lists_choices_and_an_embedded_sections_own_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_config(Verb, ["--help"])
    out = capsys.readouterr().out
    assert "--dtype {float32,bfloat16}" in out
    assert "(default: 0.7)" in out and "(default: 1.0)" not in out  # the embedding's default, not the class's
    cfg = parse_config(Verb, ["--temperature", "0.2"])
    assert cfg.sampling.temperature == 0.2 and parse_config(Verb, []).sampling.temperature == 0.7
    with pytest.raises(SystemExit):
        parse_config(Verb, ["--dtype", "int3"])
