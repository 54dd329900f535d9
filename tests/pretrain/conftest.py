"""A small prepared data directory (a slice of the built-in stdlib corpus, 512-token BPE) shared by the
pretrain tests, and a tiny PretrainConfig factory. Torch runs on one thread."""

import dataclasses

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.pretrain.prepare import PrepareConfig
from lmforge.pretrain.prepare import run as prepare
from lmforge.pretrain.train import PretrainConfig

torch.set_num_threads(1)  # the suite shares two CPU cores with others

TINY = ModelConfig(vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                   max_seq_len=64)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "data"
    assert prepare(PrepareConfig(out=str(out), vocab_size=512, builtin_bytes=250_000)) == 0
    return out


def tiny_config(data, out, **train) -> PretrainConfig:
    cfg = PretrainConfig(model=dataclasses.replace(TINY), data=str(data), out=str(out))
    defaults = dict(max_steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3, eval_every=6, eval_tokens=256,
                    log_every=2, save_every=6, samples=1, sample_tokens=8, threads=1, peak_flops=1e12, dtype="fp32")
    for k, v in {**defaults, **train}.items():
        setattr(cfg.train, k, v)
    return cfg
