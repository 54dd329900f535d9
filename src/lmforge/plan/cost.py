"""Money arithmetic, as pure functions other parts call (eval's `compare` prices 1,000 queries with these).

Conventions: US dollars; API prices per 1M tokens, input and output priced separately; self-hosted cost is the
GPU time a query occupies (tokens / throughput) at the GPU's hourly price.

"$ per 1,000 queries" has one source: `usd_per_1k_queries(price, input_tokens, output_tokens)`, where a
TokenPrice is either an API's list prices or machine time at a throughput (`throughput_price`: measured by
`lmforge compare` or `plan calibrate`, or estimated by plan/inference.py). compare's table, `plan inference`,
`plan compare` and the decision report all call it, so the same figures give the same cost everywhere. An option's cost over a horizon is a
CostLine: one-off (a finetune, an index build) + per month (an always-on GPU, a vector database) + per query.
Comparing options amortises one-off costs over the horizon, so two options' monthly costs cross at a break-even
volume in queries per month.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.errors import LmforgeError

HOURS_PER_MONTH = 730.0  # 365 * 24 / 12, the figure clouds bill a month by


def api_cost_per_query(input_tokens: float, output_tokens: float, input_usd_per_1m: float,
                       output_usd_per_1m: float) -> float:
    """Dollars for one API call: input and output tokens at their own per-1M-token prices."""
    return (input_tokens * input_usd_per_1m + output_tokens * output_usd_per_1m) / 1e6


def self_hosted_cost_per_query(tokens_per_s: float, usd_per_hour: float, tokens: float) -> float:
    """Dollars of GPU time for a query of `tokens` at a measured or estimated `tokens_per_s` (the machine's
    aggregate throughput across concurrent requests) and the machine's `usd_per_hour`."""
    if tokens_per_s <= 0:
        raise LmforgeError(f"throughput must be positive to price self-hosting, got {tokens_per_s} tokens/s")
    return usd_per_hour / 3600.0 * tokens / tokens_per_s


def cost_per_1m_tokens(tokens_per_s: float, usd_per_hour: float) -> float:
    """Dollars per 1M tokens processed at `tokens_per_s` on a machine costing `usd_per_hour`."""
    return self_hosted_cost_per_query(tokens_per_s, usd_per_hour, 1e6)


@dataclass(frozen=True)
class TokenPrice:
    """What tokens cost, US$ per 1M input and per 1M output tokens, and where the figures come from."""

    input_usd_per_1m: float
    output_usd_per_1m: float
    basis: str = ""


def throughput_price(tokens_per_s: float, usd_per_hour: float, output_tokens_per_s: float | None = None,
                     basis: str = "") -> TokenPrice:
    """Machine time as a token price: a token occupies the machine 1 / tokens_per_s seconds at usd_per_hour.

    One throughput (tokens/s over prompt and output together, as compare measures it) prices both sides;
    give `output_tokens_per_s` when prefill and decode run at different speeds (plan's estimates)."""
    out = tokens_per_s if output_tokens_per_s is None else output_tokens_per_s
    return TokenPrice(cost_per_1m_tokens(tokens_per_s, usd_per_hour), cost_per_1m_tokens(out, usd_per_hour),
                      basis or f"${usd_per_hour:g}/hour at {tokens_per_s:,.1f} tokens/s")


def usd_per_1k_queries(price: TokenPrice, input_tokens: float, output_tokens: float) -> float:
    """Dollars for 1,000 queries of `input_tokens` in and `output_tokens` out at `price`: the one formula behind
    every "$ per 1,000 queries" lmforge shows."""
    if input_tokens < 0 or output_tokens < 0:
        raise LmforgeError(f"token counts cannot be negative, got {input_tokens} in and {output_tokens} out")
    return 1000 * api_cost_per_query(input_tokens, output_tokens, price.input_usd_per_1m, price.output_usd_per_1m)


def breakeven(one_off: float, saving_per_query: float) -> float:
    """Queries after which a one-off cost (e.g. a finetune) is paid back by a per-query saving; inf if it never is."""
    if one_off < 0:
        raise LmforgeError(f"a one-off cost cannot be negative, got {one_off}")
    if saving_per_query <= 0:
        return math.inf
    return one_off / saving_per_query


def breakeven_between(one_off_a: float, per_query_a: float, one_off_b: float, per_query_b: float) -> float | None:
    """Total queries at which options A and B have cost the same (one-off + per-query * q); None if they never do
    at a positive volume (one is cheaper throughout, or the lines are parallel)."""
    if per_query_a == per_query_b:
        return None
    q = (one_off_b - one_off_a) / (per_query_a - per_query_b)
    return q if q > 0 else None


@dataclass
class CostLine:
    """What an option costs: once, every month, every query, and optionally per serving unit.

    A self-hosted model on dedicated GPUs costs `unit_per_month` for each GPU, and one GPU serves at most
    `capacity_per_unit` queries a month, so its monthly cost steps up with volume (never fewer than `min_units`).
    """

    name: str
    per_query: float = 0.0
    one_off: float = 0.0
    per_month: float = 0.0
    unit_per_month: float = 0.0
    capacity_per_unit: float | None = None  # queries a month one unit serves; None: no unit cost
    min_units: int = 1

    def units(self, queries_per_month: float) -> int:
        if not self.capacity_per_unit:
            return 0
        return max(self.min_units, math.ceil(queries_per_month / self.capacity_per_unit - 1e-9))

    def monthly(self, queries_per_month: float, months: float = 12.0) -> float:
        """Cost of a month at this volume, the one-off cost spread over `months`."""
        if months <= 0:
            raise LmforgeError(f"the horizon must be positive, got {months} months")
        return (self.one_off / months + self.per_month + self.per_query * queries_per_month
                + self.unit_per_month * self.units(queries_per_month))

    def total(self, queries_per_month: float, months: float = 12.0) -> float:
        return self.monthly(queries_per_month, months) * months


def crossovers(a: CostLine, b: CostLine, months: float = 12.0, lo: float = 1.0, hi: float = 1e10) -> list[float]:
    """Monthly volumes in [lo, hi] where A's and B's monthly costs cross (where the cheaper one changes),
    found on a log grid and refined by bisection; works for the stepped costs of dedicated GPUs too."""

    def diff(q: float) -> float:
        return a.monthly(q, months) - b.monthly(q, months)

    n = 600
    grid = [lo * (hi / lo) ** (i / n) for i in range(n + 1)]
    found: list[float] = []
    prev_q, prev_d = grid[0], diff(grid[0])
    for q in grid[1:]:
        d = diff(q)
        if (prev_d < 0 < d) or (prev_d > 0 > d):
            x0, x1 = prev_q, q
            for _ in range(80):
                mid = math.sqrt(x0 * x1)
                if (diff(mid) > 0) == (prev_d > 0):
                    x0 = mid
                else:
                    x1 = mid
            found.append(x1)
        if d != 0:
            prev_q, prev_d = q, d
    return found
