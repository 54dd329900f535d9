"""Reading a request, before anything is generated: the API key, readiness, the body, the model, the budget.

Owns: `require_key` (a dependency of every /v1 route: 'Authorization: Bearer KEY' when the server has a key),
`require_ready` (503 while loading or after a failed load), `read_body` (the body read under the size limit and
parsed into a schema here, so malformed JSON, a missing field or a value out of range is a 400 in OpenAI's
error shape, never FastAPI's 422), `body_doc` (the same schema, declared for /openapi.json), `served_model`
(name -> model and engine, or a 404), `budget` (the completion's max_tokens against the context left after
the prompt), and `off_loop` (CPU work of reading a prompt, run off the event loop under a time limit).

What reading refuses with a 400, whatever the schema: a body that Python's json cannot parse for any reason
(syntax, bad UTF-8, nesting deep enough to recurse past the interpreter's limit, an integer of more than
4,300 digits), the non-JSON constants NaN and Infinity, and a string holding a lone UTF-16 surrogate (not
Unicode: the tokenizer and the JSON encoder of the answer would both fail on it). A client that hangs up
mid-upload is ClientGone (a 499 in /metrics, not an error in the log).

`off_loop` runs chat templates and tokenization in a thread of their own, so a slow template or a huge
prompt never stalls the event loop (/health, the streams of others). Past its limit the request is a 400
and the thread is interrupted (an asynchronous exception, raised at its next Python bytecode: a template
loop stops there; a call into the tokenizer's native code finishes first).

A new route reads its request as `req = await read_body(request, MySchema)` and declares it with
`openapi_extra=body_doc(MySchema)`; the order the /v1 generation routes keep is key -> body -> readiness ->
model.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import secrets
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from lmforge.inference.engine import Engine
from lmforge.inference.load import LoadedModel
from lmforge.serve.errors import APIError, ClientGone, from_validation, not_found_model
from lmforge.serve.state import ServerState, server

Schema = TypeVar("Schema", bound=BaseModel)


def require_key(request: Request) -> None:
    """401 unless the request carries the server's API key (no key configured: every request passes)."""
    key = server(request).api_key
    if not key:
        return
    got = request.headers.get("authorization", "")
    token = got[7:].strip() if got.lower().startswith("bearer ") else ""
    if not token:
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                       code="missing_api_key")
    if not secrets.compare_digest(token.encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def require_ready(state: ServerState) -> None:
    if state.load_error:
        raise APIError(503, f"Model loading failed: {state.load_error}", type="server_error")
    if not state.ready:
        raise APIError(503, "The models are still loading; retry shortly (GET /health says when ready).",
                       type="server_error", code="loading", headers={"Retry-After": "2"})


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, read at most `limit` bytes far (413 beyond it, 400 if it is not JSON)."""
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > limit:
        raise APIError(413, f"The request body is {int(length)} bytes; the limit is {limit}.",
                       code="request_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"The request body is over the limit of {limit} bytes.",
                               code="request_too_large")
    except ClientDisconnect:
        raise ClientGone from None
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, "We could not parse the JSON body of your request: it is nested too deeply.",
                       code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int over 4,300 digits, NaN / Infinity
        raise APIError(400, f"We could not parse the JSON body of your request ({e}). Send a JSON object.",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    bad = _lone_surrogate(data)
    if bad is not None:
        raise APIError(400, f"The request body has a string with a lone UTF-16 surrogate ({bad}), which is not "
                            "valid Unicode. Send text as UTF-8, or escape it as a surrogate pair.",
                       code="invalid_json")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _lone_surrogate(data: Any) -> str | None:
    """The first lone surrogate in any string (key or value) of parsed JSON, as '\\udXXX'; None if none.
    Iterative: the depth of what json.loads accepted must not recurse here."""
    stack = [data]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    return f"\\u{ord(v[e.start]):04x}"
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


async def read_body(request: Request, schema: type[Schema]) -> Schema:
    """The body parsed into `schema`; the first problem is a 400 naming the parameter."""
    data = await read_json(request, server(request).max_body_bytes)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise from_validation(e.errors()) from None
    except RecursionError:  # deep nesting in a field the schema validates recursively
        raise APIError(400, "The request body is nested too deeply.", code="invalid_json") from None


DOCUMENTED: dict[str, type[BaseModel]] = {}  # schema name -> model: the request bodies /openapi.json publishes


def body_doc(schema: type[BaseModel]) -> dict:
    """A route's `openapi_extra` declaring `schema` as its JSON body (the app adds the schema to the
    components). The route still reads the body with read_body: its own size limit and 400s, never a 422."""
    DOCUMENTED[schema.__name__] = schema
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema.__name__}"}}}}}


def served_model(state: ServerState, name: str) -> tuple[LoadedModel, Engine]:
    if name not in state.engines:
        raise not_found_model(name, list(state.engines))
    return state.models[name], state.engines[name]


def budget(prompt_len: int, requested: int | None, max_len: int, param: str, default: int | None) -> int:
    """The completion's max_tokens: `requested` (or `default`), at most what the context leaves after the prompt.

    A prompt that fills the context (leaving no room for one token; with max_tokens 0, one over it), or
    prompt + an explicit request over it, is a 400 context_length_exceeded
    naming `param` (the prompt's parameter: "messages" or "prompt")."""
    want = requested if requested is not None else default
    need = 0 if requested == 0 else max(requested or 0, 1)  # one token at least, unless 0 (score only) is asked
    if prompt_len + need > max_len:
        asked = prompt_len + (requested or 0)
        raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                            f"{asked} tokens ({prompt_len} in the {param}, {requested or 0} for the completion). "
                            f"Please reduce the length of the {param} or completion.",
                       param=param, code="context_length_exceeded")
    return min(want, max_len - prompt_len) if want is not None else max_len - prompt_len


class _Interrupted(BaseException):
    """Raised inside an off_loop worker that ran past its time limit (BaseException: no `except Exception`
    in a template or tokenizer path can swallow it)."""


async def off_loop(fn: Callable[..., Any], *args: Any, timeout: float, what: str, param: str) -> Any:
    """fn(*args) in a thread of its own; its result, or its exception re-raised here. Past `timeout` seconds:
    a 400 naming `param` (`what` says what was slow), and the thread is interrupted."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()
    lock = threading.Lock()
    state = {"finished": False}

    def settle(result: Any, error: BaseException | None) -> None:
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(result)

    def work() -> None:
        try:
            try:
                out: tuple[Any, BaseException | None] = (fn(*args), None)
            except _Interrupted:
                raise
            except BaseException as e:  # re-raised in the handler
                out = (None, e)
            with lock:
                state["finished"] = True
        except _Interrupted:
            return
        try:
            loop.call_soon_threadsafe(settle, *out)
        except RuntimeError:  # the loop has closed: nobody is waiting
            pass

    worker = threading.Thread(target=work, name="lmforge-prompt", daemon=True)
    worker.start()
    try:
        return await asyncio.wait_for(asyncio.shield(fut), timeout)
    except TimeoutError:
        with lock:  # interrupt only while fn still runs, so the exception never lands outside `work`'s guard
            if not state["finished"] and worker.ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident),
                                                           ctypes.py_object(_Interrupted))
        raise APIError(400, f"{what} took longer than {timeout:g} s, the server's limit (--prompt-timeout).",
                       param=param, code="prompt_timeout") from None
