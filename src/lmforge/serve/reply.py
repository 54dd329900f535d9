"""The reply builder: submitted generations -> one OpenAI answer, streamed (SSE) or whole, for every route.

Owns, once for every generation route: submitting n choices per prompt (`submit`), the answer's id, object and
`created`, usage, the non-streaming body (waiting while watching for a client that went away: its generations
are cancelled and the answer is a 499), the stream (opening chunks, deltas, finish chunks,
`stream_options.include_usage`'s last `choices: []` chunk, the error event when a generation fails, and
`data: [DONE]`), and extra top-level fields beside OpenAI's (e.g. RAG's `sources`: in the body, and in the
first chunk of a stream).

What differs between endpoints is only the wording of a choice: a `Shape` says how one finished choice, the
opening of a streamed choice and one streamed delta look. ChatShape and CompletionShape are OpenAI's two;
a new kind of answer is a new Shape or a field on one; tool calls are ChatShape's `tools` (the format to parse
them in). CompletionShape scores the prompt too when the request echoes it with logprobs (the generations'
`prompt_logprobs`): in the choice, or in a stream's first chunk of that choice (sent with its first delta,
once the prompt has been scored).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse

from lmforge.errors import LmforgeError
from lmforge.inference.engine import Engine, Generation, TokenEvent
from lmforge.inference.generate import TextDelta, astream_text
from lmforge.inference.sampling import SamplingParams
from lmforge.inference.tools import ToolFormat, ToolStream
from lmforge.serve import sse
from lmforge.serve.errors import APIError, ClientGone, from_lmforge
from lmforge.serve.logprobs import chat_logprobs, completion_logprobs


def submit(engine: Engine, prompts: list[list[int]], params: SamplingParams, n: int) -> list[Generation]:
    """n generations per prompt, prompt-major (choice i answers prompts[i // n]). The engine validates the
    sampling values (the one check; its LmforgeError becomes a 400, a full queue a 429) and nothing is left
    running when one submission fails."""
    gens: list[Generation] = []
    try:
        for ids in prompts:
            for i in range(n):
                seed = None if params.seed is None else params.seed + i  # n choices differ, reproducibly
                gens.append(engine.submit(ids, params.replace(seed=seed)))
    except LmforgeError as e:
        for g in gens:
            g.cancel()
        raise from_lmforge(e) from None
    return gens


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def generated(events: list[TokenEvent]) -> list[TokenEvent]:
    """The events that carry a token (a cancellation or error event carries none)."""
    return [e for e in events if e.token is not None]


class Shape(Protocol):
    """How one endpoint words its choices. One instance per request (it may keep per-choice stream state)."""

    object: str  # the non-streaming body's "object"
    chunk_object: str  # each stream chunk's "object"
    id_prefix: str

    def choice(self, i: int, text: str, finish_reason: str, events: list[TokenEvent]) -> dict: ...

    def opening(self, i: int) -> dict | None: ...

    def deltas(self, i: int, d: TextDelta) -> list[dict]: ...


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatShape:
    """OpenAI's chat wording. With a tool format, the reply's tool calls become `tool_calls` (arguments as JSON
    text, finish_reason "tool_calls"); streamed, each call goes out once it is whole: a delta with its id,
    type and name (arguments ""), then one with its arguments, as OpenAI's stream carries them."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, tokenizer, logprobs: bool, tools: ToolFormat | None = None):
        self.tok, self.logprobs, self.tools = tokenizer, logprobs, tools
        self.streams: dict[int, ToolStream] = {}

    def choice(self, i: int, text: str, finish_reason: str, events: list[TokenEvent]) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.tools is not None:
            content, calls = self.tools.parse(text)
            if calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": [
                    {"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls]}
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return {"index": i, "message": message,
                "logprobs": chat_logprobs(self.tok, events) if self.logprobs else None, "finish_reason": finish_reason}

    def opening(self, i: int) -> dict | None:
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def deltas(self, i: int, d: TextDelta) -> list[dict]:
        events = generated(d.tokens)
        lp = chat_logprobs(self.tok, events) if self.logprobs and events else None
        text, calls, reason = d.text, [], d.finish_reason
        if self.tools is not None:
            stream = self.streams.setdefault(i, ToolStream(self.tools))
            text = stream.feed(d.text)
            if d.finish_reason is not None:
                rest, calls = stream.finish()
                text += rest
                if calls and reason == "stop":
                    reason = "tool_calls"
        out = []
        if text or lp:
            out.append({"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": None})
        for k, c in enumerate(calls):
            out.append({"index": i, "delta": {"tool_calls": [{"index": k, "id": call_id(), "type": "function",
                                                              "function": {"name": c.name, "arguments": ""}}]},
                        "logprobs": None, "finish_reason": None})
            out.append({"index": i, "delta": {"tool_calls": [{"index": k, "function": {"arguments": c.arguments}}]},
                        "logprobs": None, "finish_reason": None})
        if reason is not None:
            out.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": reason})
        return out


class CompletionShape:
    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, tokenizer, logprobs: int | None, echo: list[str] | None, n: int,
                 gens: list[Generation] | None = None):
        """logprobs: the request's `logprobs` (None: none; k: the chosen token's and k alternatives). echo:
        each prompt's text when the request asks for it back (choice i echoes echo[i // n]); with logprobs
        too, the prompt's tokens are scored, from gens[i].prompt_logprobs."""
        self.tok, self.logprobs, self.top, self.echo, self.n = tokenizer, logprobs is not None, logprobs or 0, echo, n
        self.gens = gens or []
        self.scores_prompt = bool(echo) and logprobs is not None
        self.offsets: dict[int, int] = {}  # choice -> text streamed so far (logprobs' text_offset)
        self.opened: set[int] = set()  # choices whose echo chunk went out

    def prefix(self, i: int) -> str:
        return self.echo[i // self.n] if self.echo else ""

    def prompt_events(self, i: int) -> list[TokenEvent] | None:
        return self.gens[i].prompt_logprobs if self.scores_prompt else None

    def choice(self, i: int, text: str, finish_reason: str, events: list[TokenEvent]) -> dict:
        prefix = self.prefix(i)
        lp = (completion_logprobs(self.tok, events, len(prefix), self.top, self.prompt_events(i))
              if self.logprobs else None)
        return {"index": i, "text": prefix + text, "logprobs": lp, "finish_reason": finish_reason}

    def opening(self, i: int) -> dict | None:
        if not self.echo or self.scores_prompt:  # a scored prompt goes out with the first delta
            return None
        self.opened.add(i)
        return {"index": i, "text": self.prefix(i), "logprobs": None, "finish_reason": None}

    def deltas(self, i: int, d: TextDelta) -> list[dict]:
        out = []
        if self.echo and i not in self.opened:
            self.opened.add(i)
            lp = completion_logprobs(self.tok, [], 0, self.top, self.prompt_events(i)) if self.logprobs else None
            out.append({"index": i, "text": self.prefix(i), "logprobs": lp, "finish_reason": None})
        events = generated(d.tokens)
        offset = self.offsets.get(i, len(self.prefix(i)))
        lp = completion_logprobs(self.tok, events, offset, self.top) if self.logprobs and events else None
        self.offsets[i] = offset + len(d.text)
        if d.text or lp or d.finish_reason:
            out.append({"index": i, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason})
        return out


@dataclass
class Reply:
    """Everything the builder needs to answer: the generations, how to read and word them, what to count."""

    shape: Shape
    model: str  # the served name, echoed in every body and chunk
    gens: list[Generation]
    tokenizer: Any
    stops: list[str]  # stop strings: cut before, never shown
    prompt_tokens: int
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    extra: dict[str, Any] = field(default_factory=dict)  # top-level fields beside OpenAI's


async def respond(request: Request, reply: Reply) -> dict | StreamingResponse:
    """The answer: a JSON body, or an SSE stream ending in [DONE]."""
    rid, created = f"{reply.shape.id_prefix}-{uuid.uuid4().hex}", int(time.time())
    if reply.stream:
        return StreamingResponse(_stream(reply, rid, created), media_type="text/event-stream", headers=sse.HEADERS)
    work = asyncio.ensure_future(asyncio.gather(*(_collect(g, reply.tokenizer, reply.stops) for g in reply.gens)))
    results = await _watch_disconnect(request, reply.gens, work)
    choices = [reply.shape.choice(i, text, reason, events) for i, (text, reason, _, events) in enumerate(results)]
    body = {"id": rid, "object": reply.shape.object, "created": created, "model": reply.model, "choices": choices,
            "usage": usage(reply.prompt_tokens, sum(r[2] for r in results))}
    return {**body, **reply.extra}


async def _stream(reply: Reply, rid: str, created: int) -> AsyncIterator[bytes]:
    shape = reply.shape
    extra = dict(reply.extra)  # the first chunk carries it

    def chunk(choices: list[dict], used: dict | None = None) -> bytes:
        body = {"id": rid, "object": shape.chunk_object, "created": created, "model": reply.model,
                "choices": choices}
        if reply.include_usage:
            body["usage"] = used  # null on every chunk but the last, as OpenAI sends it
        body.update(extra)
        extra.clear()
        return sse.event(body)

    used = [0] * len(reply.gens)
    for i in range(len(reply.gens)):
        c = shape.opening(i)
        if c is not None:
            yield chunk([c])
    async for i, d in _merged(reply.gens, reply.tokenizer, reply.stops):
        used[i] = d.completion_tokens
        if d.finish_reason == "error":
            yield sse.event(APIError(500, f"Generation failed: {d.error}", type="server_error").body())
            break
        for c in shape.deltas(i, d):
            yield chunk([c])
    if reply.include_usage:
        yield chunk([], usage(reply.prompt_tokens, sum(used)))
    yield sse.DONE


async def _collect(gen: Generation, tok, stops: list[str]) -> tuple[str, str, int, list[TokenEvent]]:
    """(text, finish_reason, completion tokens, token events) of one whole generation; a failure is a 500."""
    parts, events, reason, n, error = [], [], None, 0, None
    async for d in astream_text(gen, tok, stops):
        parts.append(d.text)
        events += generated(d.tokens)
        reason, n, error = d.finish_reason or reason, d.completion_tokens, d.error or error
    if reason == "error":
        raise APIError(500, f"Generation failed: {error}", type="server_error")
    return "".join(parts), reason or "stop", n, events


async def _watch_disconnect(request: Request, gens: list[Generation], work: asyncio.Future):
    """Await `work`; if the client goes away first, cancel its generations (their slots free at once)."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=0.25)
        if done:
            return work.result()
        if await request.is_disconnected():
            for g in gens:
                g.cancel()
            work.cancel()
            work.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
            raise ClientGone


async def _merged(gens: list[Generation], tok, stops: list[str]) -> AsyncIterator[tuple[int, TextDelta]]:
    """Deltas of several generations as they come, tagged with the choice index. A stream closed early (the
    client went away) cancels every generation still running."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: Generation):
        try:
            async for d in astream_text(g, tok, stops):
                await q.put((i, d))
        finally:
            await q.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            i, d = await q.get()
            if d is None:
                left -= 1
            else:
                yield i, d
    finally:
        for t in tasks:
            t.cancel()
        for g in gens:
            if not g.done:
                g.cancel()
