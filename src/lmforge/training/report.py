"""summary.json -> report.md: the one renderer every stage uses (DESIGN: "Stages write summary.json; one
renderer turns summaries into reports").

A summary is plain JSON: {"stage", "title", "status", and sections}. Sections that are mappings become
two-column tables in a fixed order (data, model, training, compute, results, then any other), "samples" (a
list of {"prompt", "text"}) become quoted generations, "plots" (file names in the run directory) become
images, and "notes" (a list of strings) a bullet list. A stage adds what it knows; the renderer needs no
change. `command` is shown under the title: the stage's own, else the command line that is running (write_summary
stores it in summary.json, so a report rendered again later still names the run's command). Keys may be
snake_case; they are shown as words. Values are formatted by kind: keys naming FLOPs in scientific notation,
`mfu` as a percentage, large integers with thousands separators.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmforge.config import command_line

SECTION_ORDER = ("data", "model", "training", "compute", "results")
_SPECIAL = {"stage", "title", "status", "created", "command", "samples", "plots", "notes", "run_dir"}


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and ("flops" in key or "flop_s" in key):
        return f"{float(value):.3g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if key == "mfu" or key.endswith("_mfu"):
            return f"{value:.1%}"
        if abs(value) >= 1e6:
            return f"{value:.3g}"
        if abs(value) >= 100:
            return f"{value:,.1f}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(key, v) for v in value) if len(value) <= 8 else f"{len(value)} items"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(k, v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def _title(key: str) -> str:
    return key.replace("_", " ")


def render_report(summary: dict) -> str:
    """Markdown for a stage summary."""
    title = summary.get("title") or f"{summary.get('stage', 'run')} report"
    lines = [f"# {title}", ""]
    meta = [f"**{_title(k)}:** {_fmt(k, summary[k])}" for k in ("stage", "status", "created", "run_dir")
            if summary.get(k) is not None]
    meta.append(f"**command:** `{summary.get('command') or command_line()}`")
    if meta:
        lines += ["  \n".join(meta), ""]
    sections = [k for k in SECTION_ORDER if isinstance(summary.get(k), dict)]
    sections += [k for k, v in summary.items() if isinstance(v, dict) and k not in sections and k not in _SPECIAL]
    for name in sections:
        rows = summary[name]
        if not rows:
            continue
        lines += [f"## {_title(name).capitalize()}", "", "| | |", "|---|---|"]
        lines += [f"| {_title(k)} | {_fmt(k, v)} |" for k, v in rows.items()]
        lines.append("")
    for png in summary.get("plots") or []:
        lines += [f"![{Path(png).stem}]({png})", ""]
    samples = summary.get("samples") or []
    if samples:
        lines += ["## Samples", ""]
        for s in samples:
            prompt = s.get("prompt", "")
            lines.append(f"Prompt: `{prompt!r}`" if prompt else "Unprompted (from a document boundary):")
            lines += ["", "```text", (s.get("text") or "").replace("```", "ʼʼʼ"), "```", ""]
    notes = summary.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_summary(run_dir: str | Path, summary: dict) -> tuple[Path, Path]:
    """Write run_dir/summary.json and the rendered run_dir/report.md; returns both paths."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    summary = {**summary, "command": summary.get("command") or command_line()}  # the report names its command
    sj, md = d / "summary.json", d / "report.md"
    sj.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    md.write_text(render_report(summary))
    return sj, md


def render_file(summary_json: str | Path) -> str:
    return render_report(json.loads(Path(summary_json).read_text()))
