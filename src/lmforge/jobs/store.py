"""The jobs database: files, fine-tuning jobs, their events and checkpoints, remembered replies and feedback, in one
SQLite file (the standard library's sqlite3) beside the run directories.

Owns the schema, the ids (OpenAI's prefixes: file-, ftjob-, ftevent-, ftckpt-; fb- for feedback), the rows as
plain dicts, cursor pagination (`after` an id, newest first, `has_more`) and the one state change that must not
race: `transition` moves a job's status only from the statuses it names (so a cancel and a finishing worker
cannot both win).

Why SQLite in WAL mode with synchronous=FULL: the server and the worker process write to it at once (WAL lets
readers and one writer proceed together; busy_timeout waits out the other's short transaction), and a process
killed with -9 loses no committed row. Every call is one short transaction; one connection per process,
serialised by a lock, is enough at the rates jobs write (a few rows per training step at most).

Replies are remembered (for `POST /v1/feedback`) in a bounded table: the newest `keep_responses` rows stay.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import string
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER NOT NULL,
  filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL, kind TEXT, records INTEGER,
  path TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER NOT NULL,
  model TEXT NOT NULL, base_path TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT,
  suffix TEXT, seed INTEGER NOT NULL, metadata TEXT, method TEXT NOT NULL, status TEXT NOT NULL,
  paused INTEGER NOT NULL DEFAULT 0, error TEXT, fine_tuned_model TEXT, finished_at INTEGER,
  trained_tokens INTEGER, estimated_finish INTEGER, result_files TEXT NOT NULL DEFAULT '[]',
  recipe TEXT, run_dir TEXT, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER, adapter TEXT);
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
  created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
  created_at INTEGER NOT NULL, step INTEGER NOT NULL, metrics TEXT NOT NULL, path TEXT NOT NULL,
  UNIQUE (job_id, step));
CREATE TABLE IF NOT EXISTS responses (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER NOT NULL,
  model TEXT NOT NULL, messages TEXT NOT NULL, choices TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER NOT NULL,
  response_id TEXT NOT NULL, choice INTEGER NOT NULL, model TEXT NOT NULL, messages TEXT NOT NULL,
  response TEXT NOT NULL, rating INTEGER NOT NULL, corrected TEXT, comment TEXT,
  UNIQUE (response_id, choice));
"""

# columns holding JSON
_JSON = {"metadata", "method", "error", "result_files", "recipe", "data", "metrics", "messages", "choices"}
ACTIVE = ("validating_files", "queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(n))


def now() -> int:
    return int(time.time())


class Store:
    """One SQLite database; safe to share between threads of a process, and between processes."""

    def __init__(self, path: str | Path, keep_responses: int = 10_000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keep_responses = keep_responses
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- plumbing -------------------------------------------------------------------------------------------
    def _rows(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return [_decode(r) for r in self._db.execute(sql, args).fetchall()]

    def _one(self, sql: str, args: tuple = ()) -> dict | None:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _exec(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def _insert(self, table: str, row: dict) -> dict:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self._exec(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(_encode(k, v) for k, v in row.items()))
        return row

    def _page(self, table: str, where: str, args: tuple, after: str | None, limit: int,
              order: str = "desc") -> tuple[list[dict], bool]:
        """Rows of `table` matching `where`, newest first (or oldest with order="asc"), starting after the row
        with id `after`; and whether more follow."""
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        if after:
            anchor = self._one(f"SELECT seq FROM {table} WHERE id = ?", (after,))
            if anchor is None:
                return [], False
            where, args = f"({where}) AND seq {op} ?", (*args, anchor["seq"])
        rows = self._rows(f"SELECT * FROM {table} WHERE {where} ORDER BY seq {direction} LIMIT ?", (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    # ---- files ----------------------------------------------------------------------------------------------
    def add_file(self, row: dict) -> dict:
        return self._insert("files", {"created_at": now(), **row})

    def file(self, file_id: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ?", (file_id,))

    def files(self, purpose: str | None, after: str | None, limit: int, order: str) -> tuple[list[dict], bool]:
        if purpose:
            return self._page("files", "purpose = ?", (purpose,), after, limit, order)
        return self._page("files", "1", (), after, limit, order)

    def delete_file(self, file_id: str) -> bool:
        return self._exec("DELETE FROM files WHERE id = ?", (file_id,)) > 0

    # ---- jobs -----------------------------------------------------------------------------------------------
    def add_job(self, row: dict) -> dict:
        return self._insert("jobs", {"created_at": now(), **row})

    def job(self, job_id: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def jobs(self, after: str | None = None, limit: int = 20, metadata: dict | None = None) -> tuple[list[dict], bool]:
        where, args = "1", ()
        for k, v in (metadata or {}).items():
            where += " AND json_extract(metadata, ?) = ?"
            args += (f"$.{json.dumps(k)}", v)
        return self._page("jobs", where, args, after, limit)

    def jobs_with_status(self, *statuses: str) -> list[dict]:
        marks = ", ".join("?" for _ in statuses)
        return self._rows(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses)

    def update_job(self, job_id: str, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._exec(f"UPDATE jobs SET {sets} WHERE id = ?", (*(_encode(k, v) for k, v in fields.items()), job_id))

    def transition(self, job_id: str, from_statuses: tuple[str, ...], to: str, **fields: Any) -> bool:
        """Set status `to` (and `fields`) only if the job is in one of `from_statuses`; True if it was."""
        fields = {"status": to, **fields}
        sets = ", ".join(f"{k} = ?" for k in fields)
        marks = ", ".join("?" for _ in from_statuses)
        return self._exec(f"UPDATE jobs SET {sets} WHERE id = ? AND status IN ({marks})",
                          (*(_encode(k, v) for k, v in fields.items()), job_id, *from_statuses)) > 0

    # ---- events and checkpoints -----------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: dict | None = None) -> dict:
        return self._insert("events", {"id": new_id("ftevent-"), "job_id": job_id, "created_at": now(),
                                       "level": level, "message": message, "type": type, "data": data or {}})

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        return self._page("events", "job_id = ?", (job_id,), after, limit)

    def add_checkpoint(self, job_id: str, step: int, metrics: dict, path: str) -> dict | None:
        """Record a checkpoint once (a step already recorded is left as it is; returns None then)."""
        row = {"id": new_id("ftckpt-"), "job_id": job_id, "created_at": now(), "step": step, "metrics": metrics,
               "path": path}
        with self._lock:
            try:
                return self._insert("checkpoints", row)
            except sqlite3.IntegrityError:
                return None

    def checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[dict], bool]:
        return self._page("checkpoints", "job_id = ?", (job_id,), after, limit)

    def checkpoint_steps(self, job_id: str) -> set[int]:
        return {r["step"] for r in self._rows("SELECT step FROM checkpoints WHERE job_id = ?", (job_id,))}

    def delete_checkpoint(self, job_id: str, step: int) -> None:
        self._exec("DELETE FROM checkpoints WHERE job_id = ? AND step = ?", (job_id, step))

    # ---- replies and feedback -------------------------------------------------------------------------------
    def remember_response(self, response_id: str, model: str, messages: list, choices: list[str]) -> None:
        """Keep a chat reply (its prompt messages and each choice's text) so feedback can name it by id."""
        with self._lock:
            self._insert("responses", {"id": response_id, "created_at": now(), "model": model, "messages": messages,
                                       "choices": choices})
            self._exec("DELETE FROM responses WHERE seq <= (SELECT MAX(seq) FROM responses) - ?",
                       (self.keep_responses,))

    def response(self, response_id: str) -> dict | None:
        return self._one("SELECT * FROM responses WHERE id = ?", (response_id,))

    def add_feedback(self, row: dict) -> dict:
        """Store feedback on a reply. Later feedback on the same reply (and choice) updates it: a new rating
        replaces the old one, a new corrected text the old one, and what the new one leaves out is kept."""
        row = {"id": new_id("fb-"), "created_at": now(), **row}
        with self._lock:
            old = self._one("SELECT * FROM feedback WHERE response_id = ? AND choice = ?",
                            (row["response_id"], row["choice"]))
            if old is not None:
                for k in ("rating", "corrected", "comment"):
                    if not row.get(k):
                        row[k] = old[k]
                self._exec("DELETE FROM feedback WHERE id = ?", (old["id"],))
            return self._insert("feedback", row)

    def feedback(self, model: str | None = None) -> list[dict]:
        if model:
            return self._rows("SELECT * FROM feedback WHERE model = ? ORDER BY seq", (model,))
        return self._rows("SELECT * FROM feedback ORDER BY seq")


def _encode(key: str, value: Any) -> Any:
    if key in _JSON and value is not None:
        return json.dumps(value, ensure_ascii=False)
    return value


def _decode(row: sqlite3.Row) -> dict:
    out = dict(row)
    for k in _JSON & out.keys():
        if out[k] is not None:
            out[k] = json.loads(out[k])
    return out
