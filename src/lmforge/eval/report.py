"""How eval shows its work: a progress bar on stderr, aligned plain-text and Markdown tables, JSON result files.

Results go to stdout (a table, or JSON with --json) and, with --out, to a file; progress and logs go to stderr.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError


@contextmanager
def progress(total: int, label: str) -> Iterator[Any]:
    """A rich progress bar on stderr; yields advance(n=1, **fields) where fields fill the `info` column."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    console = Console(stderr=True)
    # a bar only where a person watches; in logs and pipes it would only leave blank lines behind
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            bar.update(task, advance=n, info=info)

        yield advance


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]], markdown: bool = False) -> str:
    """Rows under headers, columns aligned (numbers right, text left); Markdown pipes when asked."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_numeric(r[i]) for r in cells[1:]) and any(r[i].strip() not in ("-", "") for r in cells[1:])
               for i in range(len(headers))]

    def line(r: list[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)]
        return "| " + " | ".join(parts) + " |" if markdown else "  ".join(parts).rstrip()

    out = [line(cells[0])]
    if markdown:
        out.append("| " + " | ".join(("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric)) + " |")
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def _numeric(cell: str) -> bool:
    s = cell.replace(",", "").replace("$", "").replace("%", "").strip()
    if s in ("-", ""):
        return True
    try:
        float(s.split()[0])
        return True
    except ValueError:
        return False


def write_json(obj: Any, path: str | Path) -> Path:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    except OSError as e:
        raise LmforgeError(f"cannot write {p}: {e}") from None
    return p
