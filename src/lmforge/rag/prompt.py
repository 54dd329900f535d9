"""Put retrieved chunks into a prompt that fits the generator's context, and say where they came from.

The retrieved chunks go into the last user message (every chat template has one; not all accept a system
message) as numbered sources, best first, followed by the question and an instruction to cite by number:

    Answer using the sources below when they help, citing them like [1].

    [1] docs/setup.md
    <chunk text>

    Question: <the user's message>

The prompt must fit `budget` tokens, counted with the generator's own tokenizer on the fully rendered prompt
(chat template included). When it does not, the lowest-scoring chunk is dropped first, then the next, until it fits
or no chunk is left (then the messages go out unchanged and the caller's own length check decides).

Callers: `lmforge chat --rag` and `lmforge serve --rag` call `augment_messages`; `lmforge eval task --rag` calls
`augment_prompt` for plain (non-chat) prompts. `sources` (a list of dicts: n, source, start, end, score, text) is
what the API returns beside OpenAI's fields and what `citations()` prints in the terminal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.rag.index import Hit, Index
    from lmforge.tokenizer import Tokenizer

INSTRUCTION = "Answer using the sources below when they help, citing them like [1]."


def context_block(hits: list[Hit]) -> str:
    """The numbered sources, best first."""
    return "\n\n".join(f"[{n}] {h.source}\n{h.text.strip()}" for n, h in enumerate(hits, 1))


def rag_user_content(question: str, hits: list[Hit]) -> str:
    if not hits:
        return question
    return f"{INSTRUCTION}\n\n{context_block(hits)}\n\nQuestion: {question}"


def sources_of(hits: list[Hit]) -> list[dict]:
    """JSON-ready source records, numbered as they are cited in the prompt."""
    return [{"n": n, "source": h.source, "start": h.start, "end": h.end, "score": round(h.score, 4), "text": h.text}
            for n, h in enumerate(hits, 1)]


def citations(sources: list[dict]) -> str:
    """Terminal lines for the sources of an answer: `[1] docs/a.md:120-940 (0.71)`."""
    return "\n".join(f"[{s['n']}] {s['source']}:{s['start']}-{s['end']} (score {s['score']:.2f})" for s in sources)


def fit(hits: list[Hit], render: Callable[[list[Hit]], Any], count: Callable[[Any], int], budget: int) -> tuple[Any, list[Hit]]:
    """render(kept) for the most chunks (best first) whose rendering counts at most `budget` tokens.

    Chunks are dropped lowest score first. Returns (rendering, kept hits); with none kept, render([]).
    """
    ranked = sorted(hits, key=lambda h: -h.score)
    for k in range(len(ranked), 0, -1):
        out = render(ranked[:k])
        if count(out) <= budget:
            return out, ranked[:k]
    return render([]), []


def _last_user(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    raise LmforgeError("RAG needs a user message to retrieve for; the conversation has none")


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of OpenAI's list-of-parts content."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def chat_token_counter(tokenizer: Tokenizer) -> Callable[[list[dict]], int]:
    """Tokens of messages rendered with the tokenizer's chat template and a generation prompt."""

    def count(messages: list[dict]) -> int:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count


def augment_messages(index: Index, messages: list[dict], tokenizer: Tokenizer, budget: int, top_k: int = 5,
                     count: Callable[[list[dict]], int] | None = None) -> tuple[list[dict], list[dict]]:
    """Retrieve for the last user message and put the sources into it, within `budget` prompt tokens.

    messages: OpenAI-style [{"role", "content"}]; not modified (a new list is returned).
    budget: the most prompt tokens allowed (the model's context minus the tokens reserved for the answer).
    count: tokens of a message list; default: the tokenizer's chat template with a generation prompt.
    Returns (messages to generate from, sources).
    """
    i = _last_user(messages)
    question = _text_of(messages[i].get("content"))
    if not question.strip():
        return list(messages), []
    hits = index.search(question, top_k)
    count = count or chat_token_counter(tokenizer)

    def render(kept: list[Hit]) -> list[dict]:
        out = [dict(m) for m in messages]
        out[i]["content"] = rag_user_content(question, kept)
        return out

    new, kept = fit(hits, render, count, budget)
    return new, sources_of(kept)


def augment_prompt(index: Index, prompt: str, tokenizer: Tokenizer, budget: int, top_k: int = 5,
                   prefix: str = "", query: str | None = None,
                   count: Callable[[str], int] | None = None) -> tuple[str, list[dict]]:
    """A plain-text prompt: prefix (e.g. few-shot examples) + sources + prompt, within `budget` tokens.

    query: what to retrieve for (default: the prompt itself). count: tokens of a prompt (default: tokenizer.encode).
    """
    hits = index.search(query if query is not None else prompt, top_k)

    def render(kept: list[Hit]) -> str:
        if not kept:
            return prefix + prompt
        return f"{prefix}{INSTRUCTION}\n\n{context_block(kept)}\n\n{prompt}"

    text, kept = fit(hits, render, count or (lambda t: len(tokenizer.encode(t))), budget)
    return text, sources_of(kept)
