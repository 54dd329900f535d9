"""Fixtures for the GGUF tests: tiny lmforge model directories of each family, their GGUF exports, SmolLM2 loaded
(its file and import are tests/conftest.py's, shared with the doctor's tests), and llama.cpp
(llama-cpp-python) helpers in shared.py."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.inference.tiny import make_model_dir


@pytest.fixture(scope="session")
def gguf_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@functools.cache
def _family_dir(root: str, family: str) -> Path:
    """A tiny random lmforge model of `family` (llama, mistral with a sliding window, qwen2 with biases, tied
    llama, llama with Llama 3.1 rope scaling, a wider llama whose rows fill K-quant blocks), with lmforge's own
    BPE tokenizer."""
    overrides = {
        "llama": {},
        "tied": {"tie_embeddings": True},
        "mistral": {"model_type": "mistral", "sliding_window": 64},
        "qwen2": {"model_type": "qwen2", "qkv_bias": True, "rope_theta": 1e6, "norm_eps": 1e-6},
        "wide": {"hidden_size": 256, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 512},  # K-quant blocks
        "llama31": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                    "rope_theta": 500000.0},
    }[family]
    d = make_model_dir(Path(root) / family, seed=len(family), **{"intermediate_size": 256, **overrides})
    if family == "qwen2":  # make the biases matter
        import torch

        from lmforge.checkpoint import load_model, load_tokenizer, save_model

        m = load_model(d)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        save_model(m, d, tokenizer=load_tokenizer(d))
    return d


@pytest.fixture(scope="session")
def family_dir(gguf_root):
    """family name -> tiny model directory (made on first use)."""
    return lambda family: _family_dir(str(gguf_root), family)


@functools.cache
def _export(root: str, family: str, kind: str) -> Path:
    from lmforge.inference.convert import export_gguf

    out = Path(root) / f"{family}-{kind}.gguf"
    if kind.endswith("_k") or "_k_" in kind:
        pytest.importorskip("llama_cpp")  # llama.cpp's quantizer makes the K-quants
    export_gguf(_family_dir(root, family), out, kind)
    return out


@pytest.fixture(scope="session")
def exported(gguf_root):
    """(family, type) -> a GGUF export of that tiny model (written on first use)."""
    return lambda family, kind: _export(str(gguf_root), family, kind)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_dir):
    """The imported SmolLM2 loaded by lmforge (float32, eval), shared by the tests that only read it."""
    from lmforge.checkpoint import load_model

    return load_model(smollm2_dir)
