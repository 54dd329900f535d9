"""How plan answers look: plain aligned text for people, JSON for programs. Number formatting lives here too.

Plain text on purpose (no rich): answers must be instant and paste cleanly into an issue or a spreadsheet.
"""

from __future__ import annotations

import json
import math
from typing import Any


def usd(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "never"
    if x < 0:
        return "-" + usd(-x)
    if abs(x) >= 1:
        return f"${x:,.2f}"
    if x == 0:
        return "$0"
    return f"${x:.3g}" if abs(x) >= 1e-4 else f"${x:.2e}"


def count(x: float | None) -> str:
    """A count of things (tokens, queries, parameters): 100,000 up to a billion, then 3.15e+23 style."""
    if x is None:
        return "-"
    if math.isinf(x):
        return "never"
    if abs(x) < 1e9 and float(x).is_integer():
        return f"{int(x):,}"
    if abs(x) < 1e9:
        return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.3g}"
    return f"{x:.3g}".replace("e+0", "e").replace("e+", "e")


def gb(x: float) -> str:
    """Bytes in decimal GB (as GPU memory is sold), or MB below 1 GB."""
    return f"{x / 1e9:,.1f} GB" if x >= 1e9 or x == 0 else f"{x / 1e6:,.1f} MB"


def hours(h: float) -> str:
    """Wall-clock: seconds, minutes, hours or days as fits."""
    s = h * 3600
    if s < 120:
        return f"{s:.1f} s"
    if h < 2:
        return f"{s / 60:.1f} min"
    if h < 72:
        return f"{h:.1f} h"
    return f"{h / 24:,.1f} days"


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown (GitHub) table; columns whose cells all look numeric are right-aligned."""
    numeric = [bool(rows) and all(_looks_numeric(r[i]) for r in rows) for i in range(len(headers))]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def jsonable(obj: Any) -> Any:
    """Replace inf/nan (not JSON) with None, recursively."""
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def to_json(result: dict) -> str:
    return json.dumps(jsonable(result), indent=2)


class Report:
    """A titled list of blocks: key-value sections, tables and paragraphs, rendered as aligned text."""

    def __init__(self, title: str, command: str = "") -> None:
        self.title = title
        self.command = command  # the command that produced it, shown under the title
        self.blocks: list[tuple[str, str, Any]] = []

    def kv(self, heading: str, rows: list[tuple]) -> Report:
        self.blocks.append(("kv", heading, [tuple(str(c) for c in r) for r in rows]))
        return self

    def table(self, heading: str, headers: list[str], rows: list[list]) -> Report:
        self.blocks.append(("table", heading, ([str(h) for h in headers], [[str(c) for c in r] for r in rows])))
        return self

    def lines(self, heading: str, lines: list[str]) -> Report:
        self.blocks.append(("lines", heading, list(lines)))
        return self

    def render(self) -> str:
        out = [self.title, "=" * len(self.title)] + ([f"command: {self.command}"] if self.command else [])
        for kind, heading, body in self.blocks:
            out.append("")
            if heading:
                out.append(heading)
            if kind == "kv":
                width = max((len(r[0]) for r in body), default=0)
                vwidth = max((len(r[1]) for r in body if len(r) > 2), default=0)
                for r in body:
                    line = f"  {r[0]:<{width}}  {r[1]:<{vwidth}}" if len(r) > 2 else f"  {r[0]:<{width}}  {r[1]}"
                    if len(r) > 2 and r[2]:
                        line += f"  {r[2]}"
                    out.append(line.rstrip())
            elif kind == "table":
                headers, rows = body
                widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
                numeric = [bool(rows) and all(_looks_numeric(r[i]) for r in rows) for i in range(len(headers))]
                out.append(_row(headers, widths, numeric))
                out.append("  " + "  ".join("-" * w for w in widths))
                out.extend(_row(r, widths, numeric) for r in rows)
            else:
                out.extend(f"  {line}" for line in body)
        return "\n".join(out) + "\n"


def _row(cells: list[str], widths: list[int], numeric: list[bool]) -> str:
    """One table row: numbers right-aligned, text left-aligned."""
    return "  " + "  ".join(c.rjust(w) if numeric[i] else c.ljust(w)
                            for i, (c, w) in enumerate(zip(cells, widths))).rstrip()


def _looks_numeric(cell: str) -> bool:
    c = cell.strip().lstrip("$~").replace(",", "").split(" ")[0]
    if not c or c == "-":
        return True
    try:
        float(c)
        return True
    except ValueError:
        return False
