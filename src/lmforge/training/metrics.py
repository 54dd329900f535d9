"""What a run shows and keeps while it trains: metrics.jsonl, the live progress bar, TensorBoard, loss.png.

metrics.jsonl holds one JSON object per logging step (step, tokens, loss, lr, grad_norm, tokens_per_s, mfu,
and val_loss/val_bpb on evaluation steps). On resume the writer first drops lines newer than the checkpoint
it resumes from (a killed run may have logged past its last checkpoint), so the file always describes the
one history that produced the weights. TensorBoard scalars are written as well when asked, if the
tensorboard package is installed. The progress bar (rich, on stderr) shows loss, tokens/s and ETA; when
stderr is not a terminal it prints one plain line per logging step instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError


def read_metrics(path: str | Path) -> list[dict]:
    """Every readable record of a metrics.jsonl file (a torn last line from a killed run is skipped)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends metric records to run_dir/metrics.jsonl (and TensorBoard when enabled). Use on rank 0 only."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self._fh = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LmforgeError("--train.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def _fmt_tokens(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


class ProgressBar:
    """A rich progress bar on stderr over `total` units (steps, tokens or seconds), with loss and tokens/s."""

    def __init__(self, total: float, unit: str = "steps", enabled: bool = True, start: float = 0):
        self.enabled, self.unit, self.total = enabled, unit, total
        self.live = enabled and sys.stderr.isatty()
        self._progress = None
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} " + unit),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False)
            self._task = self._progress.add_task("train", total=total, completed=start, loss="-", tps="-")
            self._progress.start()

    def update(self, completed: float, loss: float | None = None, tokens_per_s: float | None = None,
               line: str | None = None) -> None:
        """Move the bar; `line`, a log line with the same figures, is printed only when there is no live bar."""
        if not self.enabled:
            return
        if self._progress is not None:
            fields = {}
            if loss is not None:
                fields["loss"] = f"{loss:.3f}"
            if tokens_per_s is not None:
                fields["tps"] = _fmt_tokens(tokens_per_s)
            self._progress.update(self._task, completed=min(completed, self.total), **fields)
        elif line:
            self.print(line)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plot_title(title: str) -> str:
    """A "STAGE RUN" title without a run name that only repeats the stage ("pretrain pretrain" for runs/pretrain,
    "SFT sft" for runs/sft): the stage once."""
    words = title.split()
    return words[0] if len(words) == 2 and words[0].casefold() == words[1].casefold() else title


def plot_loss(metrics_path: str | Path, out_png: str | Path, title: str = "loss") -> Path | None:
    """Train and validation loss against tokens seen, as a PNG (matplotlib, Agg). None if nothing to plot."""
    records = read_metrics(metrics_path)
    train = [(r["tokens"], r["loss"]) for r in records if r.get("loss") is not None and "tokens" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None and "tokens" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.2, markersize=4)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(plot_title(title))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out)
    plt.close(fig)
    return out
