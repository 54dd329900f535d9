"""OpenAI's routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, on one APIRouter.

Every /v1 route requires the API key (a router dependency, so a new route gets it too). A generation route
reads like a recipe: read the body (request.py) -> check readiness and find the model -> the prompt's token
ids -> max_tokens from the context left -> the request's SamplingParams (schemas.py) -> submit n choices ->
hand them to the reply builder (reply.py), which streams or collects them. The routes own only what differs:
chat renders messages through the model's chat template (with retrieval first when the model has a RAG index:
its answers carry `sources`; tools are shown to the template and calls parsed from the reply); completions
take text, texts or token ids, and may echo the prompt (with `logprobs`, scored token by token as OpenAI's
legacy API and vLLM do: what lm-evaluation-harness reads). Both may be constrained (structured.py:
response_format, structured_outputs, required or named tool calls).

Templates and tokenization run off the event loop under the server's time limit (request.off_loop). Each
route declares its body and answers for /openapi.json (`body_doc`, `answers`).

Defaults follow OpenAI: completions max_tokens 16; chat max_tokens = what the context leaves after the prompt.
`max_tokens: 0` is a completion that only echoes (and scores) the prompt, so it needs `echo`.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from lmforge.errors import LmforgeError
from lmforge.inference.generate import chat_ids, completion_ids
from lmforge.serve.errors import APIError
from lmforge.serve.reply import ChatShape, CompletionShape, Reply, respond, submit
from lmforge.serve.request import (
    body_doc,
    budget,
    off_loop,
    read_body,
    require_key,
    require_ready,
    served_model,
)
from lmforge.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelList,
)
from lmforge.serve.state import server
from lmforge.serve.structured import chat_plan, completion_grammar

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

_ERRORS = {400: "a client's mistake (OpenAI's error shape, naming the parameter)", 401: "no or a wrong API key",
           404: "no such model", 413: "the body is over the size limit", 429: "the queue is full (Retry-After)",
           503: "the models are loading, or loading failed"}


def answers(ok: type, stream: bool = False, errors: tuple[int, ...] = tuple(_ERRORS)) -> dict:
    """A route's documented answers for /openapi.json: `ok` on 200 (and an SSE stream when it can stream),
    OpenAI's error shape on each status in `errors`."""
    out: dict = {code: {"model": ErrorResponse, "description": _ERRORS[code]} for code in errors}
    out[200] = {"model": ok, "description": "the answer"}
    if stream:
        out[200]["content"] = {"text/event-stream": {"schema": {
            "type": "string", "description": f"with `stream: true`: `data: <chunk>` events, each chunk shaped as "
                                             f"{ok.__name__} (usage null until the last), then `data: [DONE]`"}}}
    return out


@router.get("/models", responses=answers(ModelList, errors=(401, 503)))
async def list_models(request: Request):
    state = server(request)
    require_ready(state)
    data = []
    for name, lm in state.models.items():
        item = {"id": name, "object": "model", "created": lm.created, "owned_by": "lmforge",
                "max_model_len": state.engines[name].max_len}
        if lm.adapter is not None:
            item["parent"] = lm.path.name
        data.append(item)
    return {"object": "list", "data": data}


@router.post("/chat/completions", openapi_extra=body_doc(ChatCompletionRequest),
             responses=answers(ChatCompletion, stream=True))
async def chat_completions(request: Request):
    req = await read_body(request, ChatCompletionRequest)
    state = server(request)
    require_ready(state)
    lm, engine = served_model(state, req.model)
    tok = lm.tokenizer
    if tok is None:
        raise APIError(400, f"Model '{req.model}' has no tokenizer, so it cannot chat.", param="model")
    plan = await chat_plan(req, lm, engine)
    ids, sources = await chat_prompt(req, tok, state.augment.get(req.model), engine.max_len, state.prompt_timeout,
                                     plan.tools)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = req.sampling(budget(len(ids), requested, engine.max_len, "messages", None), req.logprobs,
                          req.top_logprobs or 0).replace(grammar=plan.grammar)
    gens = submit(engine, [ids], params, req.n)
    return await respond(request, Reply(
        ChatShape(tok, req.logprobs, plan.tool_format), req.model, gens, tok, req.stops, prompt_tokens=len(ids),
        stream=req.stream, include_usage=req.include_usage, extra={} if sources is None else {"sources": sources}))


async def chat_prompt(req: ChatCompletionRequest, tok, augment, max_len: int,
                      timeout: float, tools: list[dict] | None = None) -> tuple[list[int], list | None]:
    """The prompt's ids through the chat template (with the tools it should show), after retrieval when the
    model has a RAG hook (`augment`; its sources are returned too). What the messages or the template get
    wrong is the client's input: a 400. Retrieval, the template and the tokenizer run off the event loop, the
    latter two under `timeout`."""
    try:
        messages = [{**(m.model_extra or {}), "role": "system" if m.role == "developer" else m.role,
                     "content": m.text()} for m in req.messages]  # name, tool_calls, ... reach the template
        sources = None
        if augment is not None:  # retrieval embeds the question: CPU work, off the event loop
            reserve = req.max_completion_tokens or req.max_tokens or max_len // 4
            messages, sources = await asyncio.to_thread(augment, messages, max(max_len - reserve, 1))
        ids = await off_loop(chat_ids, tok, messages, tools, timeout=timeout, what="Applying the chat template",
                             param="messages")
        return ids, sources
    except APIError:
        raise
    except (LmforgeError, ValueError) as e:
        raise APIError(400, f"Could not apply the chat template: {e}", param="messages") from None
    except Exception as e:  # a template's raise_exception (e.g. roles out of order)
        raise APIError(400, f"The chat template rejected the messages: {e}", param="messages") from None


@router.post("/completions", openapi_extra=body_doc(CompletionRequest), responses=answers(Completion, stream=True))
async def completions(request: Request):
    req = await read_body(request, CompletionRequest)
    state = server(request)
    require_ready(state)
    lm, engine = served_model(state, req.model)
    tok = lm.tokenizer
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens 0 generates nothing: it is only useful with echo (to score the prompt). "
                            "Set echo: true, or max_tokens of 1 or more.", param="max_tokens", code="invalid_value")
    prompts = await completion_prompts(req, tok, state.prompt_timeout)
    if tok is None:
        raise APIError(400, f"Model '{req.model}' has no tokenizer, so it cannot return text.", param="model")
    max_tokens = min(budget(len(ids), req.max_tokens, engine.max_len, "prompt", 16) for ids in prompts)
    grammar = await completion_grammar(req, lm, engine)
    scores_prompt = req.echo and req.logprobs is not None
    params = req.sampling(max_tokens, req.logprobs is not None, req.logprobs or 0,
                          prompt_logprobs=req.logprobs if scores_prompt else None).replace(grammar=grammar)
    gens = submit(engine, prompts, params, req.n)
    echo = echo_texts(req, prompts, tok) if req.echo else None
    return await respond(request, Reply(
        CompletionShape(tok, req.logprobs, echo, req.n, gens), req.model, gens, tok, req.stops,
        prompt_tokens=sum(len(ids) for ids in prompts), stream=req.stream, include_usage=req.include_usage))


def prompt_texts(req: CompletionRequest) -> list[str] | None:
    """The prompt as texts (a text or a list of texts), or None when it is token ids."""
    p = req.prompt
    return [p] if isinstance(p, str) else (list(p) if all(isinstance(x, str) for x in p) else None)


def echo_texts(req: CompletionRequest, prompts: list[list[int]], tok) -> list[str]:
    """What echo gives back: each prompt as it was sent (token ids: decoded)."""
    return prompt_texts(req) or [tok.decode(ids) for ids in prompts]


async def completion_prompts(req: CompletionRequest, tok, timeout: float) -> list[list[int]]:
    """The prompts' ids: a text or a list of texts through the tokenizer (off the event loop, under
    `timeout`), or token ids (one list or several)."""
    texts = prompt_texts(req)
    try:
        if texts is not None:
            if tok is None:
                raise APIError(400, f"Model '{req.model}' has no tokenizer; send the prompt as token ids.",
                               param="prompt")
            prompts = await off_loop(lambda: [completion_ids(tok, t) for t in texts], timeout=timeout,
                                     what="Tokenizing the prompt", param="prompt")
        else:
            p = req.prompt
            prompts = [list(x) for x in p] if isinstance(p[0], list) else [list(p)]
    except LmforgeError as e:
        raise APIError(400, str(e), param="prompt") from None
    if any(not ids for ids in prompts):
        raise APIError(400, "The prompt is empty after tokenization.", param="prompt")
    return prompts
