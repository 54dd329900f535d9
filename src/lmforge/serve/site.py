"""The routes beside the API: GET / (the chat page), GET /health and GET /metrics. None needs the API key.

/health is 503 `{"status": "loading"}` until every model is loaded (or `{"status": "error", ...}` when loading
failed), then 200 with the served names. /metrics is Prometheus text (metrics.py writes it).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from lmforge.serve.state import server

STATIC = Path(__file__).parent / "static"

router = APIRouter()


@router.get("/")
async def index():
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


@router.get("/health")
async def health(request: Request):
    state = server(request)
    if state.load_error:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ok", "models": list(state.engines)}


@router.get("/metrics")
async def metrics(request: Request):
    state = server(request)
    return PlainTextResponse(state.metrics.render(state.engines), media_type="text/plain; version=0.0.4")
