"""OpenAI's fine-tuning API: /v1/fine_tuning/jobs (create, list, retrieve, cancel, pause, resume, events,
checkpoints), served by the jobs package's runner; and the hot-load of each fine-tuned model into this server.

Owns the HTTP side: the runner of this app (`runner_of`: a 404 saying how to turn the API on when the server has
no jobs directory), the base model a job trains (a served model's directory; a served adapter is refused: train
its base), query parameters (after, limit) read here so a bad one is a 400 in OpenAI's shape, and the mapping of
the jobs package's JobError to a 400 (404 for an unknown job). How jobs validate, queue and run is
jobs/runner.py's; the job, event and checkpoint objects are jobs/spec.py's.

Hot-load: when a job succeeds, `load_finetuned` puts its LoRA adapter on a fresh copy of its base (merged, so it
decodes at the base's speed, like `serve --adapter`), in the base's dtype and quantization when the base is
served, and ServerState.add_model serves it under `ft:BASE:SUFFIX:JOB`. At startup every earlier job's model is
loaded the same way before /health says ready.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import APIRouter, Depends, Request

from lmforge.errors import LmforgeError
from lmforge.inference.load import LoadedModel
from lmforge.jobs import spec
from lmforge.jobs.runner import JobRunner
from lmforge.serve.errors import APIError
from lmforge.serve.request import read_json, require_key, require_ready
from lmforge.serve.state import ServerState, server

log = logging.getLogger("lmforge.serve")
router = APIRouter(prefix="/v1/fine_tuning", dependencies=[Depends(require_key)])


@dataclass(frozen=True)
class JobsOptions:
    """The fine-tuning API's settings: where jobs, files and the database live, how jobs train, upload limit."""

    dir: Path
    run: spec.RunOptions = field(default_factory=spec.RunOptions)
    max_file_bytes: int = 512_000_000  # OpenAI's limit for one file
    keep_responses: int = 10_000  # replies remembered for feedback


def runner_of(request: Request) -> tuple[JobRunner, JobsOptions]:
    state = server(request)
    if state.jobs is None:
        raise APIError(404, "The fine-tuning API is off on this server; start it with --jobs-dir DIR.",
                       code="jobs_disabled")
    return state.jobs, request.app.state.lmforge_jobs


def job_error(e: spec.JobError) -> APIError:
    status = 404 if (e.code or "").endswith("not_found") and e.param == "fine_tuning_job_id" else 400
    return APIError(status, str(e), param=e.param, code=e.code)


def query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # ASCII digits only: str.isdigit accepts '²' and int() accepts ' 7', '1_0' and Arabic-Indic digits
    if not re.fullmatch(r"-?[0-9]{1,19}", raw) or not lo <= int(raw) <= hi:
        raise APIError(400, f"Invalid value for '{name}': an integer from {lo} to {hi} (got {raw!r}).", param=name,
                       code="invalid_value")
    return int(raw)


def page(data: list[dict], more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": more}


# ---- routes ------------------------------------------------------------------------------------------------
@router.post("/jobs")
async def create_job(request: Request):
    state = server(request)
    runner, _ = runner_of(request)
    body = await read_json(request, state.max_body_bytes)
    require_ready(state)
    try:
        job = runner.create(body, lambda name: base_path(state, name))
    except spec.JobError as e:
        raise job_error(e) from None
    return spec.job_object(job)


def base_path(state: ServerState, name: str) -> str:
    lm = state.models.get(name)
    if lm is None:
        raise spec.JobError(f"Model '{name}' is not served here, so it cannot be fine-tuned; available: "
                            f"{', '.join(n for n, m in state.models.items() if m.adapter is None) or 'none'}.",
                            "model", "model_not_available")
    if lm.adapter is not None:
        raise spec.JobError(f"Model '{name}' is a LoRA adapter on a base model; fine-tune the base model (jobs "
                            "train a new adapter on it).", "model", "model_not_available")
    return str(lm.path.resolve())


@router.get("/jobs")
async def list_jobs(request: Request):
    runner, _ = runner_of(request)
    limit = query_int(request, "limit", 20, 1, 100)
    metadata = {k[9:-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")}
    rows, more = runner.store.jobs(request.query_params.get("after"), limit, metadata)
    return page([spec.job_object(r) for r in rows], more)


@router.get("/jobs/{job_id}")
async def retrieve_job(request: Request, job_id: str):
    return _job_call(request, "get", job_id)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str):
    return _job_call(request, "cancel", job_id)


@router.post("/jobs/{job_id}/pause")
async def pause_job(request: Request, job_id: str):
    return _job_call(request, "pause", job_id)


@router.post("/jobs/{job_id}/resume")
async def resume_job(request: Request, job_id: str):
    return _job_call(request, "resume", job_id)


def _job_call(request: Request, what: str, job_id: str) -> dict:
    runner, _ = runner_of(request)
    try:
        return spec.job_object(getattr(runner, what)(job_id))
    except spec.JobError as e:
        raise job_error(e) from None


@router.get("/jobs/{job_id}/events")
async def list_events(request: Request, job_id: str):
    runner, _ = runner_of(request)
    try:
        runner.get(job_id)
    except spec.JobError as e:
        raise job_error(e) from None
    rows, more = runner.store.events(job_id, request.query_params.get("after"),
                                     query_int(request, "limit", 20, 1, 1000))
    return page([spec.event_object(r) for r in rows], more)


@router.get("/jobs/{job_id}/checkpoints")
async def list_checkpoints(request: Request, job_id: str):
    runner, _ = runner_of(request)
    try:
        job = runner.get(job_id)
    except spec.JobError as e:
        raise job_error(e) from None
    rows, more = runner.store.checkpoints(job_id, request.query_params.get("after"),
                                          query_int(request, "limit", 10, 1, 100))
    data = [spec.checkpoint_object(r, job) for r in rows]
    return {**page(data, more), "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


# ---- hot-load ----------------------------------------------------------------------------------------------
def load_finetuned(job: dict, served: dict[str, LoadedModel]) -> LoadedModel:
    """A succeeded job's model: its adapter merged into a copy of its base, loaded as the base is served."""
    from lmforge.inference.load import load

    base = Path(job["base_path"])
    twin = next((lm for lm in served.values() if lm.adapter is None and lm.path.resolve() == base.resolve()), None)
    dtype, quantize = "float32", None
    if twin is not None:
        floats = [p.dtype for p in twin.model.parameters() if p.is_floating_point()]
        dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(floats[0] if floats else None, "float32")
        quantize = twin.quantize
    return load(base, dtype=dtype, quantize=quantize, adapter=job["adapter"], name=job["fine_tuned_model"])


def serve_finetuned(state: ServerState, job: dict) -> None:
    """The runner's on_success: serve the job's model now (before its status says succeeded)."""
    state.add_model(job["fine_tuned_model"], load_finetuned(job, state.models))
    log.info("serving %s", job["fine_tuned_model"])


def serve_earlier_jobs(state: ServerState) -> None:
    """At startup: serve the model of every job that succeeded before (a missing base is logged, skipped)."""
    for job in state.jobs.succeeded():
        try:
            serve_finetuned(state, job)
        except (LmforgeError, OSError) as e:
            log.error("cannot serve %s: %s", job["fine_tuned_model"], e)
