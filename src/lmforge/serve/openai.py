"""OpenAI's routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, on one APIRouter.

Every /v1 route requires the API key (a router dependency, so a new route gets it too). A generation route
reads like a recipe: read the body (request.py) -> check readiness and find the model -> the prompt's token
ids -> max_tokens from the context left -> the request's SamplingParams (schemas.py) -> submit n choices ->
hand them to the reply builder (reply.py), which streams or collects them. The routes own only what differs:
chat renders messages through the model's chat template (with retrieval first when the model has a RAG index:
its answers carry `sources`; tools are shown to the template and calls parsed from the reply); completions
take text, texts or token ids, and may echo the prompt. Both may be constrained (structured.py: response_format,
structured_outputs, required or named tool calls).

Defaults follow OpenAI: completions max_tokens 16; chat max_tokens = what the context leaves after the prompt.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from lmforge.errors import LmforgeError
from lmforge.inference.generate import chat_ids, completion_ids
from lmforge.serve.errors import APIError
from lmforge.serve.reply import ChatShape, CompletionShape, Reply, respond, submit
from lmforge.serve.request import budget, read_body, require_key, require_ready, served_model
from lmforge.serve.schemas import ChatCompletionRequest, CompletionRequest
from lmforge.serve.state import server
from lmforge.serve.structured import chat_plan, completion_grammar

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


@router.get("/models")
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


@router.post("/chat/completions")
async def chat_completions(request: Request):
    req = await read_body(request, ChatCompletionRequest)
    state = server(request)
    require_ready(state)
    lm, engine = served_model(state, req.model)
    tok = lm.tokenizer
    if tok is None:
        raise APIError(400, f"Model '{req.model}' has no tokenizer, so it cannot chat.", param="model")
    plan = await chat_plan(req, lm, engine)
    ids, sources = await chat_prompt(req, tok, state.augment.get(req.model), engine.max_len, plan.tools)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = req.sampling(budget(len(ids), requested, engine.max_len, "messages", None), req.logprobs,
                          req.top_logprobs or 0).replace(grammar=plan.grammar)
    gens = submit(engine, [ids], params, req.n)
    return await respond(request, Reply(
        ChatShape(tok, req.logprobs, plan.tool_format), req.model, gens, tok, req.stops, prompt_tokens=len(ids),
        stream=req.stream, include_usage=req.include_usage, extra={} if sources is None else {"sources": sources}))


async def chat_prompt(req: ChatCompletionRequest, tok, augment, max_len: int,
                      tools: list[dict] | None = None) -> tuple[list[int], list | None]:
    """The prompt's ids through the chat template (with the tools it should show), after retrieval when the
    model has a RAG hook (`augment`; its sources are returned too). What the messages or the template get
    wrong is the client's input: a 400."""
    try:
        messages = [{**(m.model_extra or {}), "role": "system" if m.role == "developer" else m.role,
                     "content": m.text()} for m in req.messages]  # name, tool_calls, ... reach the template
        sources = None
        if augment is not None:  # retrieval embeds the question: CPU work, off the event loop
            reserve = req.max_completion_tokens or req.max_tokens or max_len // 4
            messages, sources = await asyncio.to_thread(augment, messages, max(max_len - reserve, 1))
        return chat_ids(tok, messages, tools), sources
    except (LmforgeError, ValueError) as e:
        raise APIError(400, f"Could not apply the chat template: {e}", param="messages") from None
    except Exception as e:  # a template's raise_exception (e.g. roles out of order)
        raise APIError(400, f"The chat template rejected the messages: {e}", param="messages") from None


@router.post("/completions")
async def completions(request: Request):
    req = await read_body(request, CompletionRequest)
    state = server(request)
    require_ready(state)
    lm, engine = served_model(state, req.model)
    tok = lm.tokenizer
    prompts = completion_prompts(req, tok)
    if tok is None:
        raise APIError(400, f"Model '{req.model}' has no tokenizer, so it cannot return text.", param="model")
    max_tokens = min(budget(len(ids), req.max_tokens, engine.max_len, "prompt", 16) for ids in prompts)
    grammar = await completion_grammar(req, lm, engine)
    params = req.sampling(max_tokens, req.logprobs is not None, req.logprobs or 0).replace(grammar=grammar)
    gens = submit(engine, prompts, params, req.n)
    echo = [tok.decode(ids) for ids in prompts] if req.echo else None
    return await respond(request, Reply(
        CompletionShape(tok, req.logprobs is not None, echo, req.n), req.model, gens, tok, req.stops,
        prompt_tokens=sum(len(ids) for ids in prompts), stream=req.stream, include_usage=req.include_usage))


def completion_prompts(req: CompletionRequest, tok) -> list[list[int]]:
    """The prompts' ids: a text or a list of texts through the tokenizer, or token ids (one list or several)."""
    p = req.prompt
    texts = [p] if isinstance(p, str) else (list(p) if all(isinstance(x, str) for x in p) else None)
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
    return prompts
