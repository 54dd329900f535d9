"""Split a document into overlapping chunks that end where a reader would pause.

A document is first cut into *units* a chunk never splits: sentences of prose, Markdown headings and list items,
whole fenced code blocks (``` ... ```), and, in source files, blank-line separated blocks (a function, a class
header). A unit longer than a chunk is cut at line ends, and a single line longer than a chunk at the last space
before the limit (the only place a chunk may end mid-sentence). Units are packed greedily into chunks of at most
`max_chars` characters; the next chunk starts with the previous chunk's last whole units that fit in
`overlap_chars`, so a fact that straddles a boundary is found whole in one of the two chunks.

Chunk sizes are in characters, not tokens, so chunking needs no tokenizer and is stable when the embedder changes;
the default (800 characters, about 200 word pieces) keeps a chunk inside MiniLM's 256-token window. Offsets are
character offsets into the document, so `text[start:end]` is the chunk verbatim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Files whose blank-line separated blocks are the units (no sentence splitting inside code).
CODE_SUFFIXES = frozenset({
    ".py", ".js", ".ts", ".tsx", ".jsx", ".java", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".go", ".rs", ".rb",
    ".php", ".swift", ".kt", ".scala", ".sh", ".bash", ".sql", ".r", ".jl", ".lua", ".pl", ".m", ".yaml", ".yml",
    ".toml", ".json", ".ini", ".cfg", ".css", ".html", ".xml",
})

_FENCE = re.compile(r"^(```|~~~)[^\n]*\n.*?^\1[ \t]*$", re.M | re.S)  # a fenced code block, fences included
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# A sentence ends at . ! ? (or the CJK 。！？), optionally followed by closing quotes/brackets, then whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])[\"'”’)\]]*(?=\s)")
_LINE_UNIT = re.compile(r"^[ \t]*(#{1,6}\s|[-*+]\s|\d+[.)]\s|>|\|)")  # heading, list item, quote, table row


@dataclass(frozen=True)
class Chunk:
    """text == document[start:end]."""

    text: str
    start: int
    end: int


def _trimmed(text: str, start: int, end: int) -> tuple[int, int] | None:
    """(start, end) without surrounding whitespace, or None if the span is blank."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def _split_long(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    """Cut a span longer than max_chars at line ends, then at the last space before the limit."""
    if end - start <= max_chars:
        return [(start, end)]
    spans: list[tuple[int, int]] = []
    pos = start
    for m in re.finditer(r"\n", text[start:end]):
        cut = start + m.end()
        if (s := _trimmed(text, pos, cut)) is not None:
            spans.append(s)
        pos = cut
    if (s := _trimmed(text, pos, end)) is not None:
        spans.append(s)
    out: list[tuple[int, int]] = []
    for s, e in spans:
        while e - s > max_chars:
            window = text[s:s + max_chars]
            cut = window.rfind(" ")
            cut = s + (cut if cut > max_chars // 2 else max_chars)  # no space in the back half: hard cut
            if (piece := _trimmed(text, s, cut)) is not None:
                out.append(piece)
            s = cut
            while s < e and text[s].isspace():
                s += 1
        if e > s:
            out.append((s, e))
    return out


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Sentence spans of a prose paragraph; heading/list/table lines are units of their own."""
    para = text[start:end]
    lines = para.split("\n")
    if len(lines) > 1 and any(_LINE_UNIT.match(line) for line in lines):
        spans, pos = [], start
        for line in lines:
            s = _trimmed(text, pos, pos + len(line))
            pos += len(line) + 1
            if s is None:
                continue
            # a list item or heading line is one unit; ordinary wrapped lines are split into sentences below
            spans.extend([s] if _LINE_UNIT.match(line) else _sentences(text, *s))
        return spans
    spans, pos = [], start
    for m in _SENTENCE_END.finditer(para):
        cut = start + m.end()
        if (s := _trimmed(text, pos, cut)) is not None:
            spans.append(s)
        pos = cut
    if (s := _trimmed(text, pos, end)) is not None:
        spans.append(s)
    return spans


def units(text: str, code: bool = False, max_chars: int = 800) -> list[tuple[int, int]]:
    """The unsplittable spans of `text` in order (each at most max_chars long)."""
    raw: list[tuple[int, int]] = []
    if code:
        pos = 0
        for m in _PARAGRAPH_BREAK.finditer(text):
            if (s := _trimmed(text, pos, m.start())) is not None:
                raw.append(s)
            pos = m.end()
        if (s := _trimmed(text, pos, len(text))) is not None:
            raw.append(s)
    else:
        pos = 0
        blocks: list[tuple[int, int, bool]] = []  # (start, end, is_code)
        for m in _FENCE.finditer(text):
            blocks.append((pos, m.start(), False))
            blocks.append((m.start(), m.end(), True))
            pos = m.end()
        blocks.append((pos, len(text), False))
        for bstart, bend, is_code in blocks:
            if is_code:
                if (s := _trimmed(text, bstart, bend)) is not None:
                    raw.append(s)
                continue
            p = bstart
            for m in _PARAGRAPH_BREAK.finditer(text, bstart, bend):
                if (s := _trimmed(text, p, m.start())) is not None:
                    raw.extend(_sentences(text, *s))
                p = m.end()
            if (s := _trimmed(text, p, bend)) is not None:
                raw.extend(_sentences(text, *s))
    out: list[tuple[int, int]] = []
    for s, e in raw:
        out.extend(_split_long(text, s, e, max_chars))
    return out


def chunk_text(text: str, max_chars: int = 800, overlap_chars: int = 160, code: bool = False) -> list[Chunk]:
    """Overlapping chunks of `text` made of whole units (see the module docstring)."""
    if max_chars < 50:
        raise ValueError(f"max_chars must be at least 50, got {max_chars}")
    if not 0 <= overlap_chars < max_chars:
        raise ValueError(f"overlap_chars must be in [0, max_chars), got {overlap_chars}")
    us = units(text, code=code, max_chars=max_chars)
    chunks: list[Chunk] = []
    i = 0
    while i < len(us):
        j = i
        while j + 1 < len(us) and us[j + 1][1] - us[i][0] <= max_chars:
            j += 1
        start, end = us[i][0], us[j][1]
        chunks.append(Chunk(text[start:end], start, end))
        if j + 1 >= len(us):
            break
        # the next chunk starts with the trailing units of this one that fit in the overlap, as long as the
        # next unit still fits beside them (otherwise the next chunk would repeat this one)
        k = j + 1
        while k - 1 > i and end - us[k - 1][0] <= overlap_chars and us[j + 1][1] - us[k - 1][0] <= max_chars:
            k -= 1
        i = k
    return chunks
