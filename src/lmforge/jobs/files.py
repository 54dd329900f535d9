"""Uploaded training files: validation line by line, atomic storage, and the File objects the API returns.

A fine-tuning file is JSONL, every line one record of the same kind:
  supervised  OpenAI's chat format: {"messages": [{"role", "content"}, ...]} with at least one assistant message
              (an assistant message may carry "weight": 0 or 1, as OpenAI's multi-turn format allows)
  dpo         OpenAI's preference format: {"input": {"messages": [...]}, "preferred_output": [assistant message],
              "non_preferred_output": [assistant message]}
  kto         (an lmforge extension) unpaired ratings as TRL writes them: {"prompt", "completion", "label": bool}
The checks are the ones the recipes apply when they read the file (data/sft.py, data/preference.py), so a file
that uploads is a file a job can train on; the first bad line is an error naming its number. The kind is kept
with the file, so a job whose method does not match its file is refused when it is created.

Storage: the upload streams into files/.ID.part, is flushed to disk, validated, then renamed to files/ID.jsonl;
a crash leaves either the whole file or a .part that the next start removes (`clean_partial`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmforge.data.preference import to_preference, to_unpaired
from lmforge.data.sft import RecordError, to_messages
from lmforge.errors import LmforgeError

KINDS = {"supervised": "a chat (supervised) record", "dpo": "a DPO preference record",
         "kto": "an unpaired (KTO) record"}
MIN_RECORDS = 10  # OpenAI's minimum number of training examples


class FileInvalid(LmforgeError):
    """An uploaded file that no job could train on; the message names the line."""


def classify(record: Any) -> str:
    """The kind of one record (see the module docstring), after the checks the recipe would make."""
    if not isinstance(record, dict):
        raise RecordError(f"each line must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = to_messages(record, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError("'messages' holds no assistant message to learn from")
        roles = {"system", "developer", "user", "assistant", "tool"}
        for j, m in enumerate(messages):
            if m["role"] not in roles:
                raise RecordError(f"'messages'[{j}] has role {m['role']!r}; expected one of {', '.join(sorted(roles))}")
        return "supervised"
    if "preferred_output" in record or "non_preferred_output" in record:
        to_preference(record)
        return "dpo"
    if "label" in record:
        to_unpaired(record)
        return "kto"
    raise RecordError(f"unrecognised record with keys {sorted(record)[:8]}: expected OpenAI's chat format "
                      "{\"messages\": [...]}, its DPO format {\"input\", \"preferred_output\", "
                      "\"non_preferred_output\"}, or {\"prompt\", \"completion\", \"label\"} for KTO")


def validate(path: Path) -> tuple[str, int]:
    """(kind, number of records) of a JSONL file; FileInvalid naming the first bad line."""
    kind, n = None, 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise FileInvalid(f"Invalid file format: line {lineno} is not UTF-8 text.") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FileInvalid(f"Invalid file format: line {lineno} is not valid JSON ({e.msg}). A fine-tuning "
                                  "file is JSONL: one JSON object per line.") from None
            try:
                this = classify(record)
            except RecordError as e:
                raise FileInvalid(f"Invalid file format: line {lineno}: {e}.") from None
            if kind is None:
                kind = this
            elif this != kind:
                raise FileInvalid(f"Invalid file format: line {lineno} is {KINDS[this]}, but line 1 was "
                                  f"{KINDS[kind]}; every line of a file must be of one kind.")
            n += 1
    if kind is None:
        raise FileInvalid("Invalid file format: the file holds no records (upload JSONL, one example per line).")
    return kind, n


def clean_partial(files_dir: Path) -> None:
    """Remove uploads a crash left half-written."""
    if files_dir.is_dir():
        for p in files_dir.glob(".*.part"):
            p.unlink(missing_ok=True)


def commit(part: Path, final: Path) -> None:
    """Make a fully written upload durable and visible under its final name."""
    with open(part, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(part, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    part = path.parent / f".{path.name}.part"
    part.write_bytes(data)
    commit(part, path)


def file_object(row: dict) -> dict:
    """OpenAI's File object."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None,
            "expires_at": None}
