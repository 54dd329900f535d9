"""Chunking: verbatim offsets, whole sentences and code blocks, size limits, overlap."""

import re

import pytest

from lmforge.rag.chunk import chunk_text, units

PROSE = " ".join(f"Sentence number {i} says something about topic {i % 7}." for i in range(60))


def test_chunks_are_verbatim_and_bounded():
    chunks = chunk_text(PROSE, max_chars=200, overlap_chars=60)
    assert len(chunks) > 5
    for c in chunks:
        assert PROSE[c.start:c.end] == c.text
        assert len(c.text) <= 200
        assert c.text.startswith("Sentence") and c.text.endswith(".")  # whole sentences only
    # every sentence lands in some chunk
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    for m in re.finditer(r"Sentence number \d+", PROSE):
        assert m.start() in covered


def test_overlap_repeats_trailing_sentences():
    chunks = chunk_text(PROSE, max_chars=200, overlap_chars=60)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end, "consecutive chunks must overlap"
        assert a.end - b.start <= 60
        assert b.end > a.end, "each chunk must add new text"
    none = chunk_text(PROSE, max_chars=200, overlap_chars=0)
    for a, b in zip(none, none[1:]):
        assert b.start >= a.end


def test_fenced_code_block_stays_whole():
    code = "```python\ndef f(x):\n\n    return x + 1\n```"
    text = f"Intro sentence one. Intro two.\n\n{code}\n\nAfter the code. More prose here."
    spans = [text[s:e] for s, e in units(text)]
    assert code in spans
    chunks = chunk_text(text, max_chars=60, overlap_chars=0)
    assert any(code in c.text for c in chunks)
    assert not any("def f" in c.text and code not in c.text for c in chunks)  # never cut inside


def test_code_files_split_at_blank_lines_not_sentences():
    src = "def a():\n    return 1. + 2.  # a float. Not a sentence.\n\n\ndef b():\n    return 2\n"
    spans = [src[s:e] for s, e in units(src, code=True)]
    assert spans == ["def a():\n    return 1. + 2.  # a float. Not a sentence.", "def b():\n    return 2"]


def test_markdown_lists_and_headings_are_units():
    text = "# Title\n- first item. Still first.\n- second item\n\nPlain text. Two sentences."
    spans = [text[s:e] for s, e in units(text)]
    assert spans == ["# Title", "- first item. Still first.", "- second item", "Plain text.", "Two sentences."]


def test_overlong_sentence_is_cut_at_spaces():
    text = "word " * 100 + "end."
    chunks = chunk_text(text, max_chars=100, overlap_chars=20)
    assert all(len(c.text) <= 100 for c in chunks)
    assert all(not c.text.startswith(" ") and "wor d" not in c.text for c in chunks)
    assert chunks[-1].text.endswith("end.")


def test_empty_and_bad_arguments():
    assert chunk_text("") == []
    assert chunk_text("   \n\n  ") == []
    with pytest.raises(ValueError):
        chunk_text("x", max_chars=100, overlap_chars=100)
