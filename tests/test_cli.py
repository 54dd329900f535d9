"""What the `lmforge` command decides before a verb runs: huge pages for inference, none for training."""

import os

import pytest

from lmforge.cli import main


@pytest.mark.parametrize("verb,want", [(["pretrain"], "0"), (["finetune", "sft"], "0"), (["generate"], "1"),
                                       (["serve"], "1")])
def test_huge_pages_for_inference_verbs_only(verb, want, monkeypatch, capsys):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == want
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the user's own choice wins
    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
