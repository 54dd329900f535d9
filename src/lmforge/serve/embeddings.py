"""POST /v1/embeddings in OpenAI's shape, for two kinds of model: the packaged sentence encoder
(all-MiniLM-L6-v2, what lmforge's retrieval uses; loaded on its first request) and every served LM (the mean of
its final hidden states, inference/embed.py). So LangChain's and LlamaIndex's OpenAI embedding clients run
their RAG against lmforge.

Owns: the request (input as a text, texts, token ids or lists of token ids; encoding_format float or base64,
base64 being the little-endian float32 bytes as OpenAI sends them; `dimensions` only as the model's own
size), usage (the tokens each input took), and refusing what would be cut: an input longer than the model's
window is a 400, not a silently truncated vector. The encoder is not listed by /v1/models (which lists the
generation models); its name is DEFAULT_EMBEDDER.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from lmforge.errors import LmforgeError
from lmforge.serve.errors import APIError, not_found_model
from lmforge.serve.request import body_doc, read_body, require_key, require_ready
from lmforge.serve.state import server

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

ENCODER = "all-MiniLM-L6-v2"  # rag/embed.py's DEFAULT_EMBEDDER (imported lazily: it is the rag extra)
_encoder_lock = threading.Lock()


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)


def _encoder(state):
    with _encoder_lock:
        if state.embedder is None:
            from lmforge.rag.embed import Embedder

            state.embedder = Embedder.load(None)
        return state.embedder


def _inputs(req: EmbeddingRequest) -> tuple[list[str] | None, list[list[int]] | None]:
    x = req.input
    if isinstance(x, str):
        return [x], None
    if not x:
        raise APIError(400, "'input' must not be empty.", param="input")
    if all(isinstance(v, str) for v in x):
        return list(x), None
    if all(isinstance(v, int) for v in x):
        return None, [list(x)]
    return None, [list(v) for v in x]


def _check_lengths(lengths: list[int], limit: int, name: str) -> None:
    for i, n in enumerate(lengths):
        if n == 0:
            raise APIError(400, f"input[{i}] is empty.", param="input")
        if n > limit:
            raise APIError(400, f"input[{i}] has {n} tokens; model '{name}' embeds at most {limit}. Shorten it.",
                           param="input", code="context_length_exceeded")


def _embed_encoder(state, texts, ids, name):
    enc = _encoder(state)
    lengths = enc.count_tokens(texts) if texts is not None else [len(v) for v in ids]
    _check_lengths(lengths, enc.max_length, name)
    vectors = enc.encode(texts) if texts is not None else enc.encode_ids(ids)
    return vectors, sum(lengths)


def _embed_lm(lm, engine, texts, ids, name):
    from lmforge.inference.embed import mean_pooled

    if ids is None:
        if lm.tokenizer is None:
            raise APIError(400, f"Model '{name}' has no tokenizer; send token ids.", param="input")
        ids = [lm.tokenizer.encode(t, add_special_tokens=True) for t in texts]
    bad = [t for v in ids for t in v if not 0 <= t < engine.vocab_size]
    if bad:
        raise APIError(400, f"Token ids {bad[:5]} are outside the vocabulary (0..{engine.vocab_size - 1}).",
                       param="input")
    _check_lengths([len(v) for v in ids], engine.max_len, name)
    return mean_pooled(lm.model, ids), sum(len(v) for v in ids)


@router.post("/embeddings", openapi_extra=body_doc(EmbeddingRequest))
async def embeddings(request: Request):
    req = await read_body(request, EmbeddingRequest)
    state = server(request)
    require_ready(state)
    texts, ids = _inputs(req)
    try:
        if req.model == ENCODER:
            vectors, used = await asyncio.to_thread(_embed_encoder, state, texts, ids, req.model)
        elif req.model in state.engines:
            vectors, used = await asyncio.to_thread(_embed_lm, state.models[req.model], state.engines[req.model],
                                                    texts, ids, req.model)
        else:
            raise not_found_model(req.model, [*state.engines, ENCODER])
    except LmforgeError as e:  # the encoder's package is missing, or its files cannot be read
        raise APIError(400, str(e), param="model") from None
    if req.dimensions is not None and req.dimensions != vectors.shape[1]:
        raise APIError(400, f"Model '{req.model}' gives {vectors.shape[1]}-dimensional embeddings and cannot "
                            f"shorten them; omit 'dimensions' or set it to {vectors.shape[1]}.", param="dimensions")
    data = []
    for i, v in enumerate(vectors):
        emb = base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" \
            else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": used, "total_tokens": used}}
