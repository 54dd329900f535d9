"""Helpers shared by the stage-2 tests (finetune, SFT and preference data): a tokenizer trained in a fraction of a
second with the special tokens of the chat formats under test, and a tiny random base model saved as an HF
directory, made by lmforge itself."""

from __future__ import annotations

from functools import lru_cache

import pytest

from lmforge.tokenizer import train_bpe

TEXT = [
    "The quick brown fox jumps over the lazy dog. What does the function do? It joins two paths.",
    "Return the sum of a and b. Split the string at the separator and return a list of parts.",
    "def join(a, *paths):\n    return a + '/' + '/'.join(paths)\n",
    "You are a helpful assistant. Hello! How are you today? I am fine, thank you.",
]
EXTRA_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@lru_cache(maxsize=1)
def _trained():
    return train_bpe(iter(TEXT * 20), 420)


def tiny_tokenizer():
    """A fresh tokenizer each call (tests may change its template), with the Llama 3 header tokens as specials."""
    import tokenizers

    from lmforge.tokenizer import Tokenizer

    base = _trained()
    backend = tokenizers.Tokenizer.from_str(base.backend.to_str())
    backend.add_special_tokens(EXTRA_SPECIALS)
    return Tokenizer(backend, chat_template=base.chat_template, **base.special_tokens)


def tiny_base(out_dir, seed: int = 0, **cfg_overrides):
    """A tiny random lmforge model with the tiny tokenizer, saved as an HF directory. Returns the path."""
    import torch

    from lmforge import checkpoint
    from lmforge.model.config import preset
    from lmforge.model.transformer import Transformer

    tok = tiny_tokenizer()
    cfg = preset("test").replace(vocab_size=512, **cfg_overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed)
    checkpoint.save_model(model, out_dir, tokenizer=tok, lineage={"stage": "test-base"})
    return out_dir


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a shared machine's other processes then cannot starve the
    OpenMP pool (an oversubscribed pool makes every small op wait). Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
