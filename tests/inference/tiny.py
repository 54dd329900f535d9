"""A tiny random model directory with a real BPE tokenizer, for the text, chat and server tests."""

import functools
from pathlib import Path

TEXT = ("The quick brown fox jumps over the lazy dog. A model learns the language of its corpus. "
        "Unicode too: café, naïve, 東京, emoji 🙂. Numbers 0 1 2 3 4 5 6 7 8 9 and code: def f(x): return x + 1\n")


@functools.cache
def tokenizer():
    """Trained once per test process (the slow part of making a model directory)."""
    from lmforge.tokenizer import train_bpe

    return train_bpe(iter([TEXT] * 20), vocab_size=400, min_frequency=1)


def make_model_dir(path: Path, seed: int = 0, max_seq_len: int = 256, **overrides) -> Path:
    import torch

    from lmforge.checkpoint import save_model
    from lmforge.model.config import preset
    from lmforge.model.transformer import Transformer

    tok = tokenizer()
    cfg = preset("test").replace(vocab_size=tok.vocab_size, max_seq_len=max_seq_len, **overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed)
    with torch.no_grad():  # larger logits than the default init, so greedy picks are far from ties
        model.lm_head.weight.mul_(4.0)
    save_model(model, path, tokenizer=tok)
    return Path(path)
