"""Prompt assembly: sources in the last user message, budget counted with the generator's tokenizer, lowest
scores dropped first; citations for the terminal."""

import pytest

from lmforge.errors import LmforgeError
from lmforge.rag.index import Hit, Index, find_documents
from lmforge.rag.prompt import augment_messages, augment_prompt, citations, fit
from tests.rag.shared import DOCS, write_docs


@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.tokenizer.bpe import train_bpe

    return train_bpe(iter(list(DOCS.values()) * 5), vocab_size=400)


@pytest.fixture(scope="module")
def index(tmp_path_factory, minilm):
    root = tmp_path_factory.mktemp("prompt")
    write_docs(root / "docs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # sources are recorded relative to the working directory
        ix = Index.create(root / "idx", minilm)
        ix.add_documents(find_documents(["docs"]))
    return ix


def _hit(score, text, n):
    return Hit(n, score, f"s{n}", 0, len(text), text, n)


def test_fit_drops_lowest_scores_first():
    hits = [_hit(0.2, "c" * 30, 3), _hit(0.9, "a" * 30, 1), _hit(0.5, "b" * 30, 2)]
    render = lambda kept: "".join(h.text for h in kept)  # noqa: E731
    out, kept = fit(hits, render, len, 65)
    assert [h.score for h in kept] == [0.9, 0.5] and out == "a" * 30 + "b" * 30
    out, kept = fit(hits, render, len, 10)
    assert kept == [] and out == ""


def test_augment_messages_within_budget(index, tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Which rocket carried astronauts to the Moon?"}]
    count = lambda ms: len(tokenizer.encode(tokenizer.apply_chat_template(ms, add_generation_prompt=True)))  # noqa: E731
    new, sources = augment_messages(index, messages, tokenizer, budget=10_000, top_k=3)
    assert messages[1]["content"] == "Which rocket carried astronauts to the Moon?"  # caller's list untouched
    assert [s["n"] for s in sources] == [1, 2, 3] and sources[0]["source"] == "docs/rockets.txt"
    assert "[1] docs/rockets.txt" in new[1]["content"] and "Saturn V" in new[1]["content"]
    assert new[1]["content"].endswith("Question: Which rocket carried astronauts to the Moon?")
    assert new[0] == messages[0]
    full = count(new)
    # a budget just under the full prompt drops exactly the lowest-scoring source
    new2, sources2 = augment_messages(index, messages, tokenizer, budget=full - 1, top_k=3)
    assert [s["source"] for s in sources2] == [s["source"] for s in sources[:2]]
    assert count(new2) <= full - 1
    # no room for any source: the messages go out unchanged
    new3, sources3 = augment_messages(index, messages, tokenizer, budget=5, top_k=3)
    assert sources3 == [] and new3 == messages
    text = citations(sources)
    assert text.splitlines()[0].startswith("[1] docs/rockets.txt:0-")


def test_augment_prompt_plain_text(index, tokenizer):
    prompt = "Question: What is a group of cats called?\nAnswer:"
    text, sources = augment_prompt(index, prompt, tokenizer, budget=10_000, top_k=2, prefix="EXAMPLES\n\n")
    assert text.startswith("EXAMPLES\n\n") and text.endswith(prompt) and "clowder" in text
    assert sources[0]["source"] == "docs/cats.md"
    assert len(tokenizer.encode(text)) <= 10_000


def test_needs_a_user_message(index, tokenizer):
    with pytest.raises(LmforgeError, match="user message"):
        augment_messages(index, [{"role": "system", "content": "x"}], tokenizer, 100)
