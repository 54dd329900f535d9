"""plan: what each stage will cost, and which option solves the problem. Pure Python; never imports torch.

Modules: prices (the YAML price table), shape (preset or estimated model shape), training (FLOPs, time, memory),
inference (API and self-hosted cost, speed, KV cache), cost (pure money functions other parts call), decision
(scenarios, break-even volumes, the recommendation), chart (matplotlib, imported lazily), calibrate (a run's
measured speed), report (tables and JSON), commands (the `lmforge plan ...` verbs).
"""

from lmforge.plan.cost import (
    CostLine,
    TokenPrice,
    api_cost_per_query,
    breakeven,
    breakeven_between,
    cost_per_1m_tokens,
    self_hosted_cost_per_query,
    throughput_price,
    usd_per_1k_queries,
)

__all__ = ["CostLine", "TokenPrice", "api_cost_per_query", "breakeven", "breakeven_between", "cost_per_1m_tokens",
           "self_hosted_cost_per_query", "throughput_price", "usd_per_1k_queries"]
