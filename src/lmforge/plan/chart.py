"""The cost-against-volume chart: each option's monthly cost over queries per month, log-log, as a PNG; and the
decision chart (`plan decide`): measured accuracy with its intervals beside the same cost lines.

matplotlib is imported inside the function (Agg backend, no display needed) so `import lmforge.plan` stays instant.
Break-even points are marked where two lines cross; a dashed line marks the scenario's expected volume.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.plan.cost import CostLine, crossovers


def cost_chart(lines: list[CostLine], months: float, out: str | Path, volume: float | None = None,
               title: str = "Monthly cost against volume", lo: float = 100.0, hi: float = 1e8) -> Path:
    """Write the chart to `out` (PNG) and return its path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out)
    if volume:
        lo, hi = min(lo, volume / 100), max(hi, volume * 100)
    n = 400
    qs = [lo * (hi / lo) ** (i / n) for i in range(n + 1)]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    try:
        for line in lines:
            # a floor of one cent keeps free-at-zero options drawable on a log axis
            ax.plot(qs, [max(line.monthly(q, months), 0.01) for q in qs], label=line.name, linewidth=1.8)
        for i, a in enumerate(lines):
            for b in lines[i + 1:]:
                for q in crossovers(a, b, months, lo, hi)[:3]:
                    ax.plot([q], [max(a.monthly(q, months), 0.01)], "o", color="black", markersize=4)
        if volume:
            ax.axvline(volume, color="grey", linestyle="--", linewidth=1, label=f"expected: {volume:,.0f}/month")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("queries per month")
        ax.set_ylabel(f"US$ per month (one-off costs spread over {months:g} months)")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, format="png")
        except OSError as e:
            raise LmforgeError(f"cannot write the chart to {out}: {e}; pass --chart PATH somewhere writable") from None
    finally:
        plt.close(fig)
    return out


def decision_chart(accuracy: list[tuple[str, float | None, list[float] | None]], metric: str, lines: list[CostLine],
                   months: float, volumes: list[float], out: str | Path, highlight: str | None = None,
                   lo: float = 100.0, hi: float = 1e7) -> Path:
    """Two panels: each measured option's accuracy with its 95% interval (the recommended one highlighted), and
    every option's monthly cost against volume (log-log), the priced volumes marked. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out)
    lo, hi = min(lo, min(volumes) / 10), max(hi, max(volumes) * 10)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), dpi=110, gridspec_kw={"width_ratios": [1, 1.4]})
    try:
        shown = [(n, a, ci) for n, a, ci in accuracy if a is not None]
        x = range(len(shown))
        acc = [a for _, a, _ in shown]
        err = [[max(0.0, a - ci[0]) for _, a, ci in shown], [max(0.0, ci[1] - a) for _, a, ci in shown]]
        colors = ["#C44E52" if n == highlight else "#4C72B0" for n, _, _ in shown]
        ax1.bar(x, acc, yerr=err, capsize=6, color=colors)
        ax1.set_xticks(list(x), [n for n, _, _ in shown], rotation=20, ha="right")
        ax1.set_ylim(0, 1)
        ax1.set_ylabel(f"accuracy ({metric}; 95% Wilson CI)")
        for i, a in enumerate(acc):
            ax1.text(i, min(a + err[1][i] + 0.02, 0.97), f"{a:.2f}", ha="center")
        ax1.set_title("accuracy" + (f" (red: recommended, {highlight})" if highlight else ""))
        n = 300
        qs = [lo * (hi / lo) ** (i / n) for i in range(n + 1)]
        for line in lines:
            style = "--" if "(API)" in line.name else "-"
            width = 2.6 if line.name == highlight else 1.5
            ax2.plot(qs, [max(line.monthly(q, months), 1e-4) for q in qs], style, label=line.name, linewidth=width)
        for v in volumes:
            ax2.axvline(v, color="grey", linestyle=":", linewidth=1)
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("queries per month")
        ax2.set_ylabel(f"US$ per month (one-off spread over {months:g} months)")
        ax2.set_title("monthly cost (dashed: API list price, not measured)")
        ax2.grid(True, which="major", alpha=0.3)
        ax2.legend(fontsize=8)
        fig.tight_layout()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, format="png")
        except OSError as e:
            raise LmforgeError(f"cannot write the chart to {out}: {e}") from None
    finally:
        plt.close(fig)
    return out
