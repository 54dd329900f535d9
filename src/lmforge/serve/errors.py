"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the matching HTTP status.

Owns: `APIError` (raised anywhere in a request, turned into the JSON body by the app's handler), `ClientGone`
(the client hung up: nobody to answer, /metrics counts a 499), and the mapping from lmforge's own errors: a
prompt over the context -> 400 context_length_exceeded, a full queue -> 429, any other LmforgeError (the
user's input) -> 400, and from pydantic's (a value of the wrong type or out of range -> 400 naming the
parameter). A client's mistake is never a 500.
"""

from __future__ import annotations

from typing import Any

from lmforge.errors import LmforgeError
from lmforge.inference.engine import ContextLengthExceeded, QueueFull


class ClientGone(Exception):
    """The client disconnected (mid-upload, or while a non-streaming answer was generated; its generations
    are cancelled then)."""


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


_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


def from_validation(errors: list[dict]) -> APIError:
    """A pydantic ValidationError's first problem, said as OpenAI says it, naming the parameter."""
    e = errors[0]
    loc = []
    for p in e.get("loc", ()):  # field names and list indices; a union's member tags ("str", "list[int]") stop it
        if isinstance(p, int) or (isinstance(p, str) and p.isidentifier() and p not in _UNION_TAGS):
            loc.append(str(p))
        else:
            break
    param = ".".join(loc) or None
    kind = e.get("type", "")
    value = e.get("input")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    got = _TYPE_NAMES.get(type(value), type(value).__name__)
    if kind.endswith("_type") or kind in ("union_tag_invalid", "finite_number", "int_from_float"):
        return APIError(400, f"Invalid type for '{param}': got {got}{_shown(value)}.", param=param,
                        code="invalid_type")
    msg = e.get("msg", "invalid value").removeprefix("Value error, ")
    return APIError(400, f"Invalid value for '{param}': {msg}{_shown(value)}.", param=param, code="invalid_value")


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _shown(value: Any) -> str:
    """The offending value, briefly (a long string or a huge number is cut; containers are named only)."""
    if isinstance(value, (dict, list)):
        return ""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a very large integer"
    return f" ({text[:80] + '...' if len(text) > 80 else text})"


def not_found_model(name: str, available: list[str]) -> APIError:
    return APIError(404, f"The model '{name}' does not exist. Available models: {', '.join(available) or 'none'}.",
                    param="model", code="model_not_found")
