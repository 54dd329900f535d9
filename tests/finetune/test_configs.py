"""The shipped finetuning configs parse into their recipes' Config classes (unknown keys would be errors)."""

from pathlib import Path

import pytest

from lmforge.config import parse_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name, cls", [("finetune-sft.yaml", "sft:SFTConfig"), ("finetune-sft-lora.yaml", "sft:SFTConfig"),
                                       ("finetune-dpo.yaml", "dpo:DPOConfig"), ("finetune-cpt.yaml", "cpt:CPTConfig")])
def test_config_files_parse(name, cls):
    from importlib import import_module

    module, attr = cls.split(":")
    cfg = parse_config(getattr(import_module(f"lmforge.finetune.{module}"), attr), ["--config", str(CONFIGS / name)])
    assert cfg.base and cfg.out
    if "lora" in name:
        assert cfg.lora.enabled and cfg.lora.rank == 16


def test_docs_state_the_epoch_defaults_the_code_has():
    """Issue 13: docs/finetune.md said SFT makes 1 epoch by default while SFTTrain says 3."""
    from lmforge.finetune.dpo import DPOTrain
    from lmforge.finetune.sft import SFTTrain

    doc = " ".join((CONFIGS.parent / "docs" / "finetune.md").read_text().split())
    assert f"(default: {SFTTrain().epochs:g} for SFT, {DPOTrain().epochs:g} for DPO)" in doc
