"""The OpenAI-compatible HTTP server: a FastAPI app over one Engine per served model (or adapter).

Routes (each on a router of its own module): GET / (the chat page), GET /health, GET /metrics (site.py);
GET /v1/models, POST /v1/chat/completions, POST /v1/completions (openai.py), streaming with SSE or not, n > 1,
stop strings, logprobs (of the prompt too, with echo), usage, structured output and tool calls (structured.py);
POST /v1/embeddings (embeddings.py); GET /tokenizer_info, POST /tokenize, POST /detokenize (tokens.py, vLLM's);
GET /openapi.json (the request bodies and answers, as declared by each route); with a jobs directory, OpenAI's
/v1/files (files.py) and /v1/fine_tuning/jobs (fine_tuning.py), and POST /v1/feedback (feedback.py).

The server, module by module: state.py (ServerState, EngineOptions: what handlers read), request.py (the key,
the body under a size limit, the model, the token budget), schemas.py (request bodies and their ranges),
reply.py (the one reply builder: stream or not, usage, [DONE]), logprobs.py, errors.py (OpenAI's error shape),
sse.py, metrics.py. Leaves to inference/ tokens, text and stop strings, to the tokenizer the chat template.

This module owns the assembly only: the lifespan (load, then stop the engines), the exception handlers that
turn every failure into OpenAI's error shape (a client's mistake is a 4xx, a bug a 500 without a traceback on
the wire), the middlewares (the request counter outermost, then guard.py's Host and Origin checks), the
OpenAPI document, and the routers. A new route goes on a router (openai.py for /v1, or a module of its own
included here).

/openapi.json is FastAPI's, plus the request bodies the routes declare with request.body_doc (they read
their bodies themselves, under the size limit and with OpenAI's 400s, so FastAPI does not see them).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge import __version__
from lmforge.inference.load import LoadedModel
from lmforge.serve import embeddings, feedback, files, fine_tuning, openai, site, tokens
from lmforge.serve.errors import APIError, ClientGone
from lmforge.serve.fine_tuning import JobsOptions
from lmforge.serve.guard import Guard
from lmforge.serve.metrics import Metrics
from lmforge.serve.request import DOCUMENTED
from lmforge.serve.state import EngineOptions, RagFactory, ServerState

log = logging.getLogger("lmforge.serve")


def create_app(models: dict[str, LoadedModel] | None = None, *,
               loader: Callable[[], dict[str, LoadedModel]] | None = None, api_key: str | None = None,
               engine: EngineOptions | None = None, max_body_bytes: int = 2_000_000,
               rag: dict[str, RagFactory] | None = None, prompt_timeout: float = 10.0,
               allowed_hosts: list[str] | None = None, cors_origins: list[str] | None = None,
               jobs: JobsOptions | None = None) -> FastAPI:
    """The app. Pass loaded `models` (name -> LoadedModel), or a `loader` run in a thread at startup
    (/health says 503 until it returns). engine: how each model's Engine is built. rag: served name ->
    factory(tokenizer) of a retrieval hook (messages, budget) -> (messages, sources); chat answers of that
    model then carry a `sources` field. prompt_timeout: seconds a request's chat template and tokenization
    may take. allowed_hosts, cors_origins: see guard.py (default: IP addresses and localhost; no other
    site's pages). jobs: the fine-tuning API's directory and settings (files, jobs, feedback; None: those
    routes say the API is off)."""
    state = ServerState(engine_options=engine or EngineOptions(), api_key=api_key, max_body_bytes=max_body_bytes,
                        rag_factories=dict(rag or {}), prompt_timeout=prompt_timeout)
    if jobs is not None:
        from lmforge.jobs.runner import JobRunner

        state.jobs = JobRunner(jobs.dir, jobs.run, on_success=lambda job: fine_tuning.serve_finetuned(state, job))
        state.jobs.store.keep_responses = jobs.keep_responses

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if models:
            state.add(models)
            if state.jobs is not None:
                fine_tuning.serve_earlier_jobs(state)
        elif loader is not None:
            if state.jobs is None:
                state.load_in_background(loader)
            else:  # earlier jobs' models are part of what loads before /health says ready
                def load_all():
                    state.add(loader())
                    fine_tuning.serve_earlier_jobs(state)
                    return {}
                state.load_in_background(load_all)
        else:
            state.ready = True
        if state.jobs is not None:
            state.jobs.start()
        yield
        if state.jobs is not None:
            state.jobs.stop()
        state.stop()

    app = FastAPI(title="lmforge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.lmforge = state
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(Exception, server_bug)
    app.state.lmforge_jobs = jobs
    if state.jobs is not None:  # inside Guard: a refused request is never remembered
        app.add_middleware(feedback.RememberReplies, store=state.jobs.store)
    app.add_middleware(Guard, allowed_hosts=allowed_hosts or (), cors_origins=cors_origins or ())
    app.add_middleware(CountRequests, metrics=state.metrics)  # added last: outermost, so it counts refusals too
    app.include_router(site.router)
    app.include_router(openai.router)
    app.include_router(embeddings.router)
    app.include_router(tokens.router)
    for router in (files.router, fine_tuning.router, feedback.router):
        app.include_router(router)
    app.openapi = lambda: openapi_document(app)
    return app


def openapi_document(app: FastAPI) -> dict:
    """FastAPI's document (routes, answers) plus the request bodies declared with request.body_doc."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                          description="An OpenAI-compatible API (and vLLM's tokenizer routes) over lmforge's engine.")
        _, defs = models_json_schema([(m, "validation") for m in DOCUMENTED.values()],
                                     ref_template="#/components/schemas/{model}")
        doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = doc
    return app.openapi_schema


# ---- errors: everything leaves in OpenAI's shape -----------------------------------------------------------
async def api_error(request: Request, exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Starlette's own 404 / 405 for URLs no route serves."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    msg = f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404 else str(exc.detail)
    return JSONResponse(APIError(exc.status_code, msg, type=kind).body(), status_code=exc.status_code)


async def client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it, /metrics counts it


async def server_bug(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error")
    return JSONResponse(APIError(500, f"The server had an error: {type(exc).__name__}.", type="server_error").body(),
                        status_code=500)


class CountRequests:
    """Counts HTTP requests by route and status for /metrics. Pure ASGI, so streaming and disconnects pass
    through untouched. The label is the matched route's path template (bounded, also for routes with path
    parameters); a URL no route serves counts as "other"."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")  # set by the router on a match (FastAPI and Starlette both)
            self.metrics.record(getattr(route, "path", None) or "other", status[0])
