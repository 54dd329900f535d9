"""Token log-probabilities in OpenAI's two shapes: chat's `{"content": [...]}` and completions' parallel lists.

Owns the formatting only; the numbers come from the engine's TokenEvents (the raw model distribution, see
inference/sampling.py). Token text is each id decoded alone, special tokens included, as OpenAI shows it.
"""

from __future__ import annotations

from lmforge.inference.engine import TokenEvent


def token_text(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tok, events: list[TokenEvent]) -> dict | None:
    """{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}; None without logprobs."""
    content = []
    for e in events:
        if e.logprob is None:
            return None
        t = token_text(tok, e.token)
        tops = [{"token": token_text(tok, i), "logprob": lp, "bytes": list(token_text(tok, i).encode())}
                for i, lp in (e.top_logprobs or [])]
        content.append({"token": t, "logprob": e.logprob, "bytes": list(t.encode()), "top_logprobs": tops})
    return {"content": content}


def completion_logprobs(tok, events: list[TokenEvent], offset: int) -> dict | None:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"}; `offset`: the choice's text before these
    tokens (the echoed prompt, earlier deltas). None without logprobs."""
    if not events or events[0].logprob is None:
        return None
    tokens, lps, tops, offs = [], [], [], []
    for e in events:
        t = token_text(tok, e.token)
        tokens.append(t)
        lps.append(e.logprob)
        tops.append({token_text(tok, i): lp for i, lp in (e.top_logprobs or [])} if e.top_logprobs else None)
        offs.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}
