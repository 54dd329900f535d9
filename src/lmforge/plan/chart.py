"""The cost-against-volume chart: each option's monthly cost over queries per month, log-log, as a PNG.

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
