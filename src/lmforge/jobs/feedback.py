"""`lmforge feedback export`: users' ratings of served replies (POST /v1/feedback, the chat page's thumbs and edits)
-> training data for the feedback loop.

    lmforge feedback export --jobs-dir runs/jobs --format kto --out ratings.jsonl   # then: lmforge finetune kto
    lmforge feedback export --jobs-dir runs/jobs --format dpo --out pairs.jsonl     # then: finetune dpo, or upload
                                                                                    #   it for a dpo job

kto  unpaired records, TRL's {"prompt": [messages], "completion": [assistant message], "label": bool}: a thumbs
     up is desirable, a thumbs down undesirable; an edited reply is a desirable completion, and the original it
     corrects is undesirable unless it was rated up.
dpo  pairs in OpenAI's DPO fine-tuning format ({"input": {"messages"}, "preferred_output",
     "non_preferred_output"}): an edit against the original it corrects, and, for the same prompt, each reply
     rated up against each reply rated down (a preferred regeneration).
The database is read while the server may be writing it (SQLite's WAL lets both), and the output file is written
whole or not at all.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import opt
from lmforge.errors import LmforgeError
from lmforge.jobs.files import write_atomic
from lmforge.jobs.runner import DB_NAME
from lmforge.jobs.store import Store

FORMATS = ("kto", "dpo")


@dataclass
class ExportConfig:
    jobs_dir: str = opt("runs/jobs", "the server's --jobs-dir (its database holds the feedback)")
    format: str = opt("kto", "kto: unpaired desirable/undesirable records; dpo: preference pairs (OpenAI's format)",
                      choices=list(FORMATS))
    out: str = opt("", "JSONL file to write (default: standard output)")
    model: str = opt("", "only feedback on replies of this served model (default: all)")


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def kto_records(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        edited = r["corrected"] is not None and r["corrected"] != r["response"]
        if (r["rating"] != 0 or edited) and r["response"]:  # a reply of tool calls only has no text to rate
            label = r["rating"] > 0  # an edit with no rating says the original was not what the user wanted
            out.append({"prompt": r["messages"], "completion": _assistant(r["response"]), "label": label})
        if edited:
            out.append({"prompt": r["messages"], "completion": _assistant(r["corrected"]), "label": True})
    return out


def dpo_records(rows: list[dict]) -> list[dict]:
    def pair(messages: list, good: str, bad: str) -> dict:
        return {"input": {"messages": messages}, "preferred_output": _assistant(good),
                "non_preferred_output": _assistant(bad)}

    out = [pair(r["messages"], r["corrected"], r["response"]) for r in rows
           if r["corrected"] is not None and r["corrected"] != r["response"] and r["response"]]
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(json.dumps(r["messages"], sort_keys=True), []).append(r)
    for group in by_prompt.values():
        ups = [r["response"] for r in group if r["rating"] > 0 and r["response"]]
        downs = [r["response"] for r in group if r["rating"] < 0 and r["response"]]
        out += [pair(group[0]["messages"], u, d) for u in ups for d in downs if u != d]
    return out


def export(jobs_dir: str | Path, fmt: str, model: str | None = None) -> list[dict]:
    db = Path(jobs_dir) / DB_NAME
    if not db.is_file():
        raise LmforgeError(f"{jobs_dir} holds no jobs database ({DB_NAME}); give the --jobs-dir the server runs with")
    if fmt not in FORMATS:
        raise LmforgeError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    store = Store(db)
    try:
        rows = store.feedback(model or None)
    finally:
        store.close()
    return kto_records(rows) if fmt == "kto" else dpo_records(rows)


def run(cfg: ExportConfig) -> int:
    records = export(cfg.jobs_dir, cfg.format, cfg.model)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, text.encode())
        print(f"wrote {len(records)} {cfg.format} records to {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if not records:
        print("no feedback to export yet (rate replies on the chat page or POST /v1/feedback)", file=sys.stderr)
    return 0
