"""Token log-probabilities in OpenAI's two shapes: chat's `{"content": [...]}` and completions' parallel lists.

Owns the formatting only; the numbers come from the engine's TokenEvents (the raw model distribution, see
inference/sampling.py). Token text is each id decoded alone, special tokens included, as OpenAI shows it.

Completions follow OpenAI's legacy layout: `tokens`, `token_logprobs`, `top_logprobs` (a dict token -> logprob
per position, the chosen token included beside the top k, as OpenAI documents "up to logprobs+1" entries)
and `text_offset` (where each token starts in the choice's text). With echo the prompt's tokens come first:
the first has no context, so its logprob and top_logprobs are null (`prompt_events`).

Every number is finite JSON: -inf (a token of probability 0, or an overflowing fp16 logit) becomes -9999.0,
as vLLM writes it, and NaN (a broken model) becomes null; strict JSON parsers reject NaN and Infinity.
"""

from __future__ import annotations

import math

from lmforge.inference.engine import TokenEvent

FLOOR = -9999.0  # what -inf is written as


def finite(lp: float | None) -> float | None:
    """A logprob as JSON may carry it: NaN -> None, -inf -> FLOOR, +inf -> 0.0 (no logprob is above 0)."""
    if lp is None or math.isnan(lp):
        return None
    if math.isinf(lp):
        return FLOOR if lp < 0 else 0.0
    return lp


def token_text(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tok, events: list[TokenEvent]) -> dict | None:
    """{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}; None without logprobs."""
    content = []
    for e in events:
        if e.logprob is None:
            return None
        t = token_text(tok, e.token)
        tops = [{"token": token_text(tok, i), "logprob": finite(lp), "bytes": list(token_text(tok, i).encode())}
                for i, lp in (e.top_logprobs or [])]
        content.append({"token": t, "logprob": finite(e.logprob), "bytes": list(t.encode()), "top_logprobs": tops})
    return {"content": content}


def completion_logprobs(tok, events: list[TokenEvent], offset: int, top: int = 0,
                        prompt_events: list[TokenEvent] | None = None) -> dict | None:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"} over the prompt's events (with echo; their
    offsets count from 0, the start of the echoed text), then the generated `events` (offsets from `offset`,
    the choice's text before them). `top`: the alternatives asked for (0: top_logprobs entries are null).
    None when there is nothing to show."""
    generated = events if events and events[0].logprob is not None else []
    if prompt_events is None and not generated:
        return None
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part, start in ((prompt_events or [], 0), (generated, offset)):
        for e in part:
            t = token_text(tok, e.token)
            out["tokens"].append(t)
            out["token_logprobs"].append(finite(e.logprob))
            alts = None
            if top and e.logprob is not None:
                alts = {token_text(tok, i): finite(lp) for i, lp in (e.top_logprobs or [])[:top]}
                alts.setdefault(t, finite(e.logprob))  # the chosen token is always there (OpenAI: up to k + 1)
            out["top_logprobs"].append(alts)
            out["text_offset"].append(start)
            start += len(t)
    return out
