"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the matching HTTP status.

Owns: `APIError` (raised anywhere in a request, turned into the JSON body by the app's handler) and the
mapping from lmforge's own errors: a prompt over the context -> 400 context_length_exceeded, a full queue ->
429, any other LmforgeError (the user's input) -> 400. A client's mistake is never a 500.
"""

from __future__ import annotations

from typing import Any

from lmforge.errors import LmforgeError
from lmforge.inference.engine import ContextLengthExceeded, QueueFull


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_lmforge(e: LmforgeError, param: str | None = None) -> APIError:
    if isinstance(e, ContextLengthExceeded):
        return APIError(400, str(e), param="messages" if param == "messages" else "prompt",
                        code="context_length_exceeded")
    if isinstance(e, QueueFull):
        return APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    return APIError(400, str(e), param=param)


def from_validation(errors: list[dict]) -> APIError:
    """A pydantic ValidationError's first problem, said as OpenAI says it, naming the parameter."""
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    if e.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    msg = e.get("msg", "invalid value").removeprefix("Value error, ")
    value = e.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return APIError(400, f"Invalid value for '{param}': {msg} (got {shown}).", param=param, code="invalid_value")


def not_found_model(name: str, available: list[str]) -> APIError:
    return APIError(404, f"The model '{name}' does not exist. Available models: {', '.join(available) or 'none'}.",
                    param="model", code="model_not_found")
