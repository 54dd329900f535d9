"""OpenAI's Files API for fine-tuning data: POST /v1/files (multipart, purpose `fine-tune`), GET /v1/files,
GET /v1/files/{id}, DELETE /v1/files/{id}, GET /v1/files/{id}/content.

Owns the HTTP side only: reading the multipart upload as the openai client sends it (fields `file` and
`purpose`) into the jobs directory under the size limit (413 beyond it), and the list/retrieve/delete/content
answers. What a valid file is, and how it is stored atomically, is jobs/files.py's; where its records live,
jobs/store.py's. A file that fails validation is a 400 naming the line, and nothing of it is kept.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from lmforge.jobs import files as jfiles
from lmforge.jobs.store import new_id
from lmforge.serve.errors import APIError
from lmforge.serve.fine_tuning import query_int, runner_of
from lmforge.serve.request import require_key

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
PURPOSES = ("fine-tune",)
CHUNK = 1 << 20


def _not_found(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", param="id", code="file_not_found")


@router.post("/files")
async def create_file(request: Request):
    runner, limits = runner_of(request)
    limit = limits.max_file_bytes
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > limit + 65536:  # the multipart framing is not the file
        raise APIError(413, f"The upload is {int(length)} bytes; files may be at most {limit} bytes.",
                       code="file_too_large")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "Upload files as multipart/form-data with the fields 'file' and 'purpose'.",
                       code="invalid_content_type")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as e:  # a malformed multipart body (python-multipart's MultiPartException and kin)
        raise APIError(400, f"Could not read the multipart upload: {e}", code="invalid_multipart") from None
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
        if purpose is None:
            raise APIError(400, "Missing required parameter: 'purpose'.", param="purpose",
                           code="missing_required_parameter")
        if purpose not in PURPOSES:
            raise APIError(400, f"Invalid value for 'purpose': lmforge stores files for fine-tuning; use "
                                f"'fine-tune' (got {purpose!r}).", param="purpose", code="invalid_value")
        file_id = new_id("file-")
        part = runner.files_dir / f".{file_id}.part"
        final = runner.files_dir / f"{file_id}.jsonl"
        try:
            size = await asyncio.to_thread(_spool, upload, part, limit)
            kind, records = await asyncio.to_thread(jfiles.validate, part)
            await asyncio.to_thread(jfiles.commit, part, final)
        except jfiles.FileInvalid as e:
            raise APIError(400, str(e), param="file", code="invalid_file_format") from None
        finally:
            part.unlink(missing_ok=True)
    finally:
        await form.close()
    row = runner.store.add_file({"id": file_id, "filename": Path(upload.filename or "upload.jsonl").name,
                                 "purpose": purpose, "bytes": size, "kind": kind, "records": records,
                                 "path": str(final)})
    return jfiles.file_object(row)


def _spool(upload: UploadFile, part: Path, limit: int) -> int:
    """Copy the upload into `part`, at most `limit` bytes (413 beyond)."""
    size = 0
    upload.file.seek(0)
    with open(part, "wb") as out:
        while chunk := upload.file.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"The file is over the limit of {limit} bytes.", param="file",
                               code="file_too_large")
            out.write(chunk)
    return size


@router.get("/files")
async def list_files(request: Request):
    runner, _ = runner_of(request)
    q = request.query_params
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, f"Invalid value for 'order': 'asc' or 'desc' (got {order!r}).", param="order")
    rows, more = runner.store.files(q.get("purpose"), q.get("after"), query_int(request, "limit", 10000, 1, 10000),
                                    order)
    data = [jfiles.file_object(r) for r in rows]
    return {"object": "list", "data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/files/{file_id}")
async def retrieve_file(request: Request, file_id: str):
    runner, _ = runner_of(request)
    row = runner.store.file(file_id)
    if row is None:
        raise _not_found(file_id)
    return jfiles.file_object(row)


@router.delete("/files/{file_id}")
async def delete_file(request: Request, file_id: str):
    runner, _ = runner_of(request)
    row = runner.store.file(file_id)
    if row is None or not runner.store.delete_file(file_id):
        raise _not_found(file_id)
    Path(row["path"]).unlink(missing_ok=True)  # jobs that use it hold their own link to the bytes
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/files/{file_id}/content")
async def file_content(request: Request, file_id: str):
    runner, _ = runner_of(request)
    row = runner.store.file(file_id)
    if row is None or not Path(row["path"]).is_file():
        raise _not_found(file_id)
    return FileResponse(row["path"], media_type="application/octet-stream", filename=row["filename"])
