"""Fixtures for the tokenizer tests: a small mixed-language corpus and one tokenizer trained on it per session."""

import pytest

from lmforge.tokenizer import train_bpe

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the tokens before it.",
    "Training loss falls as the model learns the statistics of the corpus.",
    "def forward(self, x):\n    return self.proj(x) + x\n",
    "Numbers like 12345 and 3.14159 are split into groups of digits.",
    "We'll see that it's easy; they're sure you've heard I'd done it.",
    "机器学习是人工智能的一个分支。",  # Chinese
    "東京は日本の首都です。",  # Japanese
    "Les élèves étudient à l'école.",  # French, precomposed accents
    "Привет, мир! Как дела?",  # Russian
]


def corpus_text(repeats: int = 12) -> str:
    """About 6 KB of text; each sentence is repeated so BPE has pairs worth merging."""
    lines = []
    for r in range(repeats):
        for i, s in enumerate(_SENTENCES):
            lines.append(f"{s} (line {r * len(_SENTENCES) + i})")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus() -> str:
    return corpus_text()


@pytest.fixture(scope="session")
def tok(corpus):
    return train_bpe(iter([corpus]), 400)
