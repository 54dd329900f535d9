"""Helpers for the GGUF tests: a text sample, llama.cpp opened the same way everywhere, logits from both sides."""

from __future__ import annotations

from pathlib import Path

import pytest

# Text that exercises the split: contractions, digit runs, punctuation, unicode, code, newlines, spaces.
SAMPLE = ("Hello world! It's 2024-05-17, we've got 1234567 apples & 3.14 pies.\n\n  Indented  code:\n"
          "def f(x):\n    return x ** 2  # café, naïve, 東京, emoji 🙂\r\nTabs\tand  spaces   end. ")


def llama(path: Path, n_ctx: int = 256, logits_all: bool = True):
    """A llama.cpp model with an F32 KV cache (type 0), keeping every position's logits. One thread: llama.cpp's
    OpenMP workers spin-wait at every barrier, which on two shared, busy cores makes two threads ~20x slower."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, verbose=False,
                           logits_all=logits_all, type_k=0, type_v=0, seed=0)


def llama_logits(path: Path, ids: list[int]):
    """llama.cpp's logits [T, V] (float32 numpy) for ids."""
    import numpy as np

    llm = llama(path)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def lmforge_logits(model, ids: list[int]):
    """lmforge's logits [T, V] for ids, from a model directory or a loaded model."""
    import torch

    from lmforge.checkpoint import load_model

    m = load_model(model) if isinstance(model, (str, Path)) else model
    with torch.no_grad():
        return m(torch.tensor([ids]))[0].float().numpy()
