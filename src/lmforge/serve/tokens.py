"""POST /tokenize and POST /detokenize, vLLM's debugging routes for templates and tokenizers (API key required).

/tokenize takes {"model", "prompt"} (a raw text, with the tokenizer's own special tokens unless
add_special_tokens is false) or {"model", "messages"} (through the chat template, with the assistant turn
opened unless add_generation_prompt is false; `tools` shown as the chat route shows them) and answers
{"count", "max_model_len", "tokens"} (plus "token_strs" when return_token_strs is true). /detokenize takes
{"model", "tokens"} and answers {"prompt": text}.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from lmforge.errors import LmforgeError
from lmforge.inference.tools import prepare_messages
from lmforge.serve.errors import APIError
from lmforge.serve.request import read_body, require_key, require_ready, served_model
from lmforge.serve.state import server

router = APIRouter(dependencies=[Depends(require_key)])


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    tokens: list[int]


def _tokenizer(state, name: str):
    lm, engine = served_model(state, name)
    if lm.tokenizer is None:
        raise APIError(400, f"Model '{name}' has no tokenizer.", param="model")
    return lm.tokenizer, engine


@router.post("/tokenize")
async def tokenize(request: Request):
    req = await read_body(request, TokenizeRequest)
    state = server(request)
    require_ready(state)
    tok, engine = _tokenizer(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "Give exactly one of 'prompt' and 'messages'.", param="prompt")
    try:
        if req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            text = tok.apply_chat_template(prepare_messages(req.messages),
                                           add_generation_prompt=req.add_generation_prompt, tools=req.tools)
            ids = tok.encode(text, add_special_tokens=False)
    except LmforgeError as e:
        raise APIError(400, str(e), param="messages" if req.messages is not None else "prompt") from None
    body = {"count": len(ids), "max_model_len": engine.max_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = [tok.id_to_token(i) for i in ids]
    return body


@router.post("/detokenize")
async def detokenize(request: Request):
    req = await read_body(request, DetokenizeRequest)
    state = server(request)
    require_ready(state)
    tok, _ = _tokenizer(state, req.model)
    try:
        return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}
    except LmforgeError as e:
        raise APIError(400, str(e), param="tokens") from None
