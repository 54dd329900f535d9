"""Reading a request, before anything is generated: the API key, readiness, the body, the model, the budget.

Owns: `require_key` (a dependency of every /v1 route: 'Authorization: Bearer KEY' when the server has a key),
`require_ready` (503 while loading or after a failed load), `read_body` (the body read under the size limit and
parsed into a schema here, so malformed JSON, a missing field or a value out of range is a 400 in OpenAI's
error shape, never FastAPI's 422), `served_model` (name -> model and engine, or a 404) and `budget` (the
completion's max_tokens against the context left after the prompt).

A new route reads its request as `req = await read_body(request, MySchema)`; the order the /v1 generation
routes keep is key -> body -> readiness -> model.
"""

from __future__ import annotations

import json
import secrets
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from lmforge.inference.engine import Engine
from lmforge.inference.load import LoadedModel
from lmforge.serve.errors import APIError, from_validation, not_found_model
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
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"The request body is {int(length)} bytes; the limit is {limit}.",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"The request body is over the limit of {limit} bytes.", code="request_too_large")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e}). Send a JSON object.",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


async def read_body(request: Request, schema: type[Schema]) -> Schema:
    """The body parsed into `schema`; the first problem is a 400 naming the parameter."""
    data = await read_json(request, server(request).max_body_bytes)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise from_validation(e.errors()) from None


def served_model(state: ServerState, name: str) -> tuple[LoadedModel, Engine]:
    if name not in state.engines:
        raise not_found_model(name, list(state.engines))
    return state.models[name], state.engines[name]


def budget(prompt_len: int, requested: int | None, max_len: int, param: str, default: int | None) -> int:
    """The completion's max_tokens: `requested` (or `default`), at most what the context leaves after the prompt.

    A prompt that fills the context, or prompt + an explicit request over it, is a 400 context_length_exceeded
    naming `param` (the prompt's parameter: "messages" or "prompt")."""
    want = requested if requested is not None else default
    if prompt_len >= max_len or (requested is not None and prompt_len + requested > max_len):
        asked = prompt_len + (requested or 0)
        raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                            f"{asked} tokens ({prompt_len} in the {param}, {requested or 0} for the completion). "
                            f"Please reduce the length of the {param} or completion.",
                       param=param, code="context_length_exceeded")
    return min(want, max_len - prompt_len) if want is not None else max_len - prompt_len
