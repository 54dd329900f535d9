"""The OpenAI-compatible HTTP server: a FastAPI app over one Engine per served model (or adapter).

Routes: GET / (the chat page), GET /health (503 while loading, 200 when ready; no key), GET /metrics
(Prometheus text; no key), GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming
with SSE or not, n > 1, stop strings, logprobs, usage; `stream_options.include_usage` adds one final chunk
with `choices: []`).

Owns: HTTP, request parsing (the body is read with a size limit and parsed here, so that malformed JSON, a
missing field or a value out of range is a 400 in OpenAI's error shape, never FastAPI's 422), the API key,
turning text deltas into OpenAI chunks, and cancelling generations whose client went away (a closed stream
cancels at once; a non-streaming request is polled for disconnection).
Leaves to inference/ tokens, text and stop strings, to the tokenizer the chat template.

Defaults follow OpenAI: temperature 1, top_p 1; completions max_tokens 16; chat max_tokens = what the context
leaves after the prompt. prompt + max_tokens over the context is a 400 context_length_exceeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LmforgeError
from lmforge.inference.engine import Engine, Generation
from lmforge.inference.generate import TextDelta, astream_text, chat_ids, completion_ids
from lmforge.inference.load import LoadedModel
from lmforge.inference.sampling import SamplingParams
from lmforge.serve import sse
from lmforge.serve.errors import APIError, from_lmforge, from_validation, not_found_model
from lmforge.serve.metrics import Metrics
from lmforge.serve.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("lmforge.serve")
STATIC = Path(__file__).parent / "static"
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


class ClientGone(Exception):
    """The client of a non-streaming request disconnected; its generations were cancelled."""


class ServerState:
    """Models, their engines, readiness, counters: what every request handler reads."""

    def __init__(self, engine_kwargs: dict[str, Any], rag: dict[str, Callable] | None = None):
        self.rag_factories = rag or {}  # served name -> (tokenizer -> augment callable)
        self.augment: dict[str, Callable] = {}
        self.models: dict[str, LoadedModel] = {}
        self.engines: dict[str, Engine] = {}
        self.ready = False
        self.load_error: str | None = None
        self.metrics = Metrics()
        self.engine_kwargs = engine_kwargs

    def add(self, models: dict[str, LoadedModel]) -> None:
        for name, lm in models.items():
            engine = Engine(lm.model, eos_ids=lm.eos_ids, **self.engine_kwargs)
            if self.engine_kwargs.get("compile"):
                engine.warmup()  # compile before /health says ready, not on the first user's request
            engine.start()
            self.models[name], self.engines[name] = lm, engine
            if name in self.rag_factories:
                self.augment[name] = self.rag_factories[name](lm.tokenizer)
        self.ready = True

    def stop(self) -> None:
        for e in self.engines.values():
            e.stop()


def create_app(models: dict[str, LoadedModel] | None = None, *,
               loader: Callable[[], dict[str, LoadedModel]] | None = None, api_key: str | None = None,
               max_batch: int = 8, max_queue: int = 64, max_len: int | None = None, prefill_chunk: int = 512,
               max_body_bytes: int = 2_000_000, compile: bool = False,
               rag: dict[str, Callable] | None = None) -> FastAPI:
    """The app. Pass loaded `models` (name -> LoadedModel), or a `loader` run in a thread at startup
    (/health says 503 until it returns). rag: served name -> factory(tokenizer) of a retrieval hook
    (messages, budget) -> (messages, sources); chat answers of that model then carry a `sources` field."""
    state = ServerState(dict(max_batch=max_batch, max_queue=max_queue, max_len=max_len,
                             prefill_chunk=prefill_chunk, compile=compile), rag)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if models:
            state.add(models)
        elif loader is not None:
            def load_all():
                try:
                    state.add(loader())
                except LmforgeError as e:
                    state.load_error = str(e)
                    log.error("loading failed: %s", e)
                except Exception as e:  # report it on /health instead of dying silently in a thread
                    state.load_error = f"{type(e).__name__}: {e}"
                    log.exception("loading failed")

            threading.Thread(target=load_all, name="lmforge-loader", daemon=True).start()
        else:
            state.ready = True
        yield
        state.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmforge = state

    # ---- errors ------------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(APIError(exc.status_code, msg, type=kind).body(), status_code=exc.status_code)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, /metrics counts it

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"The server had an error: {type(exc).__name__}.", type="server_error")
                            .body(), status_code=500)

    # ---- metrics middleware (pure ASGI, so streaming and disconnects pass through untouched) ------------
    class CountRequests:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            status = [500]

            async def send_and_note(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, send_and_note)
            finally:
                path = scope.get("path", "")
                state.metrics.record(path if path in ROUTES else "other", status[0])

    app.add_middleware(CountRequests)

    # ---- helpers -----------------------------------------------------------------------------------------
    def check_key(request: Request) -> None:
        if not api_key:
            return
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got.lower().startswith("bearer ") else ""
        if not token:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                           code="missing_api_key")
        if not secrets.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_ready() -> None:
        if state.load_error:
            raise APIError(503, f"Model loading failed: {state.load_error}", type="server_error")
        if not state.ready:
            raise APIError(503, "The models are still loading; retry shortly (GET /health says when ready).",
                           type="server_error", code="loading", headers={"Retry-After": "2"})

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            raise APIError(413, f"The request body is {int(length)} bytes; the limit is {max_body_bytes}.",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise APIError(413, f"The request body is over the limit of {max_body_bytes} bytes.",
                               code="request_too_large")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request ({e}). Send a JSON object.",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        return data

    def parse(cls, data: dict):
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise from_validation(e.errors()) from None

    def lookup(name: str) -> tuple[LoadedModel, Engine]:
        if name not in state.engines:
            raise not_found_model(name, list(state.engines))
        return state.models[name], state.engines[name]

    def budget(prompt_len: int, requested: int | None, engine: Engine, param: str, default: int | None) -> int:
        ctx = engine.max_len
        want = requested if requested is not None else default
        if prompt_len >= ctx or (requested is not None and prompt_len + requested > ctx):
            asked = prompt_len + (requested or 0)
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{asked} tokens ({prompt_len} in the {param}, {requested or 0} for the completion). "
                                f"Please reduce the length of the {param} or completion.",
                           param=param, code="context_length_exceeded")
        return min(want, ctx - prompt_len) if want is not None else ctx - prompt_len

    def sampling(req, max_tokens: int, logprobs: bool, top_logprobs: int, vocab: int) -> SamplingParams:
        sp = SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k, 0), min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, seed=req.seed, stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs)
        try:
            return sp.validate(vocab)
        except LmforgeError as e:
            raise APIError(400, str(e)) from None

    def submit_all(engine: Engine, prompts: list[list[int]], params: SamplingParams, n: int) -> list[Generation]:
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

    async def watch_disconnect(request: Request, gens: list[Generation], work: asyncio.Future):
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

    def token_text(tok, token_id: int) -> str:
        return tok.decode([token_id], skip_special_tokens=False)

    async def collect(gen: Generation, tok, stops: list[str]) -> tuple[str, str, int, list]:
        parts, events, reason, n, error = [], [], None, 0, None
        async for d in astream_text(gen, tok, stops):
            parts.append(d.text)
            events += [e for e in d.tokens if e.token is not None]
            reason, n, error = d.finish_reason or reason, d.completion_tokens, d.error or error
        if reason == "error":
            raise APIError(500, f"Generation failed: {error}", type="server_error")
        return "".join(parts), reason or "stop", n, events

    def chat_logprobs(tok, events: list) -> dict | None:
        content = []
        for e in events:
            if e.logprob is None:
                return None
            t = token_text(tok, e.token)
            tops = [{"token": token_text(tok, i), "logprob": lp, "bytes": list(token_text(tok, i).encode())}
                    for i, lp in (e.top_logprobs or [])]
            content.append({"token": t, "logprob": e.logprob, "bytes": list(t.encode()), "top_logprobs": tops})
        return {"content": content}

    def completion_logprobs(tok, events: list, offset: int) -> dict | None:
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

    async def merged(gens: list[Generation], tok, stops: list[str]) -> AsyncIterator[tuple[int, TextDelta]]:
        """Deltas of several generations as they come, tagged with the choice index."""
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

    # ---- routes ------------------------------------------------------------------------------------------
    @app.get("/")
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "models": list(state.engines)}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.engines), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        check_ready()
        data = []
        for name, lm in state.models.items():
            item = {"id": name, "object": "model", "created": lm.created, "owned_by": "lmforge",
                    "max_model_len": state.engines[name].max_len}
            if lm.adapter is not None:
                item["parent"] = lm.path.name
            data.append(item)
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        data = await read_json(request)
        req = parse(ChatCompletionRequest, data)
        check_ready()
        lm, engine = lookup(req.model)
        tok = lm.tokenizer
        if tok is None:
            raise APIError(400, f"Model '{req.model}' has no tokenizer, so it cannot chat.", param="model")
        try:
            messages = []
            for m in req.messages:
                msg = {**(m.model_extra or {}), "role": "system" if m.role == "developer" else m.role,
                       "content": m.text()}
                messages.append(msg)
            sources = None
            augment = state.augment.get(req.model)
            if augment is not None:  # retrieval embeds the question: CPU work, off the event loop
                reserve = req.max_completion_tokens or req.max_tokens or engine.max_len // 4
                messages, sources = await asyncio.to_thread(augment, messages, max(engine.max_len - reserve, 1))
            ids = chat_ids(tok, messages)
        except (LmforgeError, ValueError) as e:
            raise APIError(400, f"Could not apply the chat template: {e}", param="messages") from None
        except Exception as e:  # a template's raise_exception (e.g. roles out of order) is the client's input
            raise APIError(400, f"The chat template rejected the messages: {e}", param="messages") from None
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = budget(len(ids), requested, engine, "messages", None)
        params = sampling(req, max_tokens, req.logprobs, req.top_logprobs or 0, engine.vocab_size)
        gens = submit_all(engine, [ids], params, req.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stops = req.stops

        if not req.stream:
            work = asyncio.ensure_future(asyncio.gather(*(collect(g, tok, stops) for g in gens)))
            results = await watch_disconnect(request, gens, work)
            choices = [{"index": i, "message": {"role": "assistant", "content": text},
                        "logprobs": chat_logprobs(tok, events) if req.logprobs else None, "finish_reason": reason}
                       for i, (text, reason, _, events) in enumerate(results)]
            used = sum(r[2] for r in results)
            body = {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": choices,
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": used, "total_tokens": len(ids) + used}}
            if sources is not None:
                body["sources"] = sources  # beside OpenAI's fields: what the answer was grounded in
            return body

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list, usage: Any = None, extra: dict | None = None) -> bytes:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": choices}
            if include_usage:
                body["usage"] = usage
            return sse.event({**body, **(extra or {})})

        async def stream():
            used = [0] * len(gens)
            for i in range(len(gens)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}], extra={"sources": sources} if sources is not None and i == 0 else None)
            async for i, d in merged(gens, tok, stops):
                used[i] = d.completion_tokens
                if d.finish_reason == "error":
                    yield sse.event(APIError(500, f"Generation failed: {d.error}", type="server_error").body())
                    break
                events = [e for e in d.tokens if e.token is not None]
                lp = chat_logprobs(tok, events) if req.logprobs and events else None
                if d.text or lp:
                    yield chunk([{"index": i, "delta": {"content": d.text}, "logprobs": lp, "finish_reason": None}])
                if d.finish_reason is not None:
                    yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason}])
            if include_usage:
                total = sum(used)
                yield chunk([], {"prompt_tokens": len(ids), "completion_tokens": total,
                                 "total_tokens": len(ids) + total})
            yield sse.DONE

        return StreamingResponse(stream(), media_type="text/event-stream", headers=sse.HEADERS)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        data = await read_json(request)
        req = parse(CompletionRequest, data)
        check_ready()
        lm, engine = lookup(req.model)
        tok = lm.tokenizer
        p = req.prompt
        if isinstance(p, str):
            texts = [p]
        elif all(isinstance(x, str) for x in p):
            texts = list(p)
        else:
            texts = None
        try:
            if texts is not None:
                if tok is None:
                    raise APIError(400, f"Model '{req.model}' has no tokenizer; send the prompt as token ids.",
                                   param="prompt")
                prompts = [completion_ids(tok, t) for t in texts]
            else:
                prompts = [list(x) for x in p] if isinstance(p[0], list) else [list(p)]
        except LmforgeError as e:
            raise APIError(400, str(e), param="prompt") from None
        if any(not ids for ids in prompts):
            raise APIError(400, "The prompt is empty after tokenization.", param="prompt")
        if tok is None:
            raise APIError(400, f"Model '{req.model}' has no tokenizer, so it cannot return text.", param="model")
        max_tokens = min(budget(len(ids), req.max_tokens, engine, "prompt", 16) for ids in prompts)
        params = sampling(req, max_tokens, req.logprobs is not None, req.logprobs or 0, engine.vocab_size)
        gens = submit_all(engine, prompts, params, req.n)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        stops = req.stops
        prompt_tokens = sum(len(ids) for ids in prompts)
        echo_texts = [tok.decode(ids) for ids in prompts] if req.echo else None

        if not req.stream:
            work = asyncio.ensure_future(asyncio.gather(*(collect(g, tok, stops) for g in gens)))
            results = await watch_disconnect(request, gens, work)
            choices = []
            for i, (text, reason, _, events) in enumerate(results):
                prefix = echo_texts[i // req.n] if echo_texts else ""
                lp = completion_logprobs(tok, events, len(prefix)) if req.logprobs is not None else None
                choices.append({"index": i, "text": prefix + text, "logprobs": lp, "finish_reason": reason})
            used = sum(r[2] for r in results)
            return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                                                  "total_tokens": prompt_tokens + used}}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list, usage: Any = None) -> bytes:
            body = {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": choices}
            if include_usage:
                body["usage"] = usage
            return sse.event(body)

        async def stream():
            used = [0] * len(gens)
            offsets = [len(echo_texts[i // req.n]) if echo_texts else 0 for i in range(len(gens))]
            if echo_texts:
                for i in range(len(gens)):
                    yield chunk([{"index": i, "text": echo_texts[i // req.n], "logprobs": None,
                                  "finish_reason": None}])
            async for i, d in merged(gens, tok, stops):
                used[i] = d.completion_tokens
                if d.finish_reason == "error":
                    yield sse.event(APIError(500, f"Generation failed: {d.error}", type="server_error").body())
                    break
                events = [e for e in d.tokens if e.token is not None]
                lp = completion_logprobs(tok, events, offsets[i]) if req.logprobs is not None and events else None
                offsets[i] += len(d.text)
                if d.text or lp or d.finish_reason:
                    yield chunk([{"index": i, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}])
            if include_usage:
                total = sum(used)
                yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": total,
                                 "total_tokens": prompt_tokens + total})
            yield sse.DONE

        return StreamingResponse(stream(), media_type="text/event-stream", headers=sse.HEADERS)

    return app
