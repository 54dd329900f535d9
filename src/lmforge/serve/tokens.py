"""The tokenizer routes beside the API, as vLLM serves them: GET /tokenizer_info, POST /tokenize, POST /detokenize
(API key required when the server has one).

/tokenize takes {"model", "prompt"} (a raw text, with the tokenizer's own special tokens unless
add_special_tokens is false) or {"model", "messages"} (through the chat template, with the assistant turn
opened unless add_generation_prompt is false; `tools` shown as the chat route shows them) and answers
{"count", "max_model_len", "tokens"} (plus "token_strs" when return_token_strs is true); templates and
tokenization run off the event loop under the server's time limit, as on the generation routes.
/detokenize takes {"model", "tokens"} and answers {"prompt": text}. /tokenizer_info gives the special tokens
and the chat template.

`model` is optional on all three (default: the first served model): lm-evaluation-harness probes
/tokenizer_info and /tokenize without one and, when both answer, uses the server's own tokenizer ("remote"
backend), so `--model local-completions` needs no tokenizer name and scores exactly the tokens the model sees
(its `auth_token` model argument sends the key).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from lmforge.errors import LmforgeError
from lmforge.inference.tools import prepare_messages
from lmforge.serve.errors import APIError, not_found_model
from lmforge.serve.request import body_doc, off_loop, read_body, require_key, require_ready
from lmforge.serve.schemas import ErrorResponse, TokenId
from lmforge.serve.state import ServerState, server

router = APIRouter(dependencies=[Depends(require_key)])
_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TokenizeRequest(BaseModel):
    """POST /tokenize: a text, or chat messages through the model's template."""

    model_config = _STRICT
    model: str | None = Field(default=None, min_length=1, max_length=256)
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = _STRICT
    model: str | None = Field(default=None, min_length=1, max_length=256)
    tokens: list[TokenId]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class TokenizeResponse(_Doc):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeResponse(_Doc):
    prompt: str


class TokenizerInfo(_Doc):
    """GET /tokenizer_info: the special tokens and chat template of a served model's tokenizer."""

    tokenizer_class: str
    model_max_length: int
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None


_ERRS = {code: {"model": ErrorResponse, "description": what} for code, what in (
    (400, "a client's mistake"), (401, "no or a wrong API key"), (404, "no such model"), (413, "body too large"),
    (503, "loading"))}


def _tokenizer(state: ServerState, name: str | None):
    """(tokenizer, context length) of `name`, or of the first served model."""
    require_ready(state)
    name = name if name is not None else next(iter(state.engines), "")
    if name not in state.engines:
        raise not_found_model(name, list(state.engines))
    tok = state.models[name].tokenizer
    if tok is None:
        raise APIError(400, f"Model '{name}' has no tokenizer.", param="model")
    return tok, state.engines[name].max_len


def _chat_ids(tok, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> list[int]:
    text = tok.apply_chat_template(prepare_messages(messages), add_generation_prompt=add_generation_prompt,
                                   tools=tools)
    return tok.encode(text, add_special_tokens=False)


@router.get("/tokenizer_info", responses={200: {"model": TokenizerInfo, "description": "the tokenizer"}, **_ERRS})
async def tokenizer_info(request: Request, model: str | None = None):
    tok, max_len = _tokenizer(server(request), model)
    templates = tok.chat_templates
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
            "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
            "chat_template": templates.get("default") or next(iter(templates.values()), None)}


@router.post("/tokenize", openapi_extra=body_doc(TokenizeRequest),
             responses={200: {"model": TokenizeResponse, "description": "the ids"}, **_ERRS})
async def tokenize(request: Request):
    req = await read_body(request, TokenizeRequest)
    state = server(request)
    tok, max_len = _tokenizer(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "Give exactly one of 'prompt' and 'messages'.", param="prompt")
    param = "messages" if req.messages is not None else "prompt"
    try:
        if req.prompt is not None:
            ids = await off_loop(tok.encode, req.prompt, req.add_special_tokens, timeout=state.prompt_timeout,
                                 what="Tokenizing the prompt", param=param)
        else:
            ids = await off_loop(_chat_ids, tok, req.messages, req.tools, req.add_generation_prompt,
                                 timeout=state.prompt_timeout, what="Applying the chat template", param=param)
    except APIError:
        raise
    except (LmforgeError, ValueError) as e:
        raise APIError(400, str(e), param=param) from None
    except Exception as e:  # a template's raise_exception
        raise APIError(400, f"The chat template rejected the messages: {e}", param=param) from None
    body = {"count": len(ids), "max_model_len": max_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = [tok.id_to_token(i) for i in ids]
    return body


@router.post("/detokenize", openapi_extra=body_doc(DetokenizeRequest),
             responses={200: {"model": DetokenizeResponse, "description": "the text"}, **_ERRS})
async def detokenize(request: Request):
    req = await read_body(request, DetokenizeRequest)
    tok, _ = _tokenizer(server(request), req.model)
    try:
        return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}
    except LmforgeError as e:
        raise APIError(400, str(e), param="tokens") from None
