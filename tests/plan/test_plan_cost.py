"""The money arithmetic: the worked numbers from the issue, break-even, crossovers of stepped costs."""

import math

import pytest

from lmforge.errors import LmforgeError
from lmforge.plan import cost
from lmforge.plan.prices import load_prices


def test_gpt4_query_and_month():
    gpt4 = load_prices().model("gpt-4")
    assert (gpt4.input_usd_per_1m, gpt4.output_usd_per_1m) == (30.0, 60.0)  # $0.03 / $0.06 per 1K
    per_query = cost.api_cost_per_query(500, 500, gpt4.input_usd_per_1m, gpt4.output_usd_per_1m)
    assert per_query == pytest.approx(0.045)
    assert per_query * 100_000 == pytest.approx(4500.0)


def test_finetune_breakeven_worked_example():
    assert cost.breakeven(2000, 0.02) == pytest.approx(100_000)
    assert cost.breakeven(2000, 0.0) == math.inf
    assert cost.breakeven_between(0, 0.045, 2000, 0.025) == pytest.approx(100_000)
    assert cost.breakeven_between(0, 0.01, 2000, 0.02) is None  # B costs more up front and per query: never
    with pytest.raises(LmforgeError):
        cost.breakeven(-1, 0.02)


def test_self_hosted_cost_per_query():
    # 1,000 tokens at 100 tokens/s = 10 s of a $3.60/h machine = 1 cent
    assert cost.self_hosted_cost_per_query(100, 3.6, 1000) == pytest.approx(0.01)
    assert cost.cost_per_1m_tokens(1000, 3.6) == pytest.approx(1.0)
    with pytest.raises(LmforgeError):
        cost.self_hosted_cost_per_query(0, 3.6, 1000)


def test_costline_crossover_matches_the_closed_form():
    api = cost.CostLine("api", per_query=0.045)
    tuned = cost.CostLine("finetuned", per_query=0.025, one_off=2000)
    # over a 1-month horizon the monthly break-even is the total one: 100,000 queries
    (q,) = cost.crossovers(api, tuned, months=1)
    assert q == pytest.approx(100_000, rel=1e-6)
    # spread over 10 months, the one-off weighs a tenth as much per month
    (q,) = cost.crossovers(api, tuned, months=10)
    assert q == pytest.approx(10_000, rel=1e-6)
    assert tuned.total(10_000, 10) == pytest.approx(api.total(10_000, 10))


def test_dedicated_gpus_step_with_volume():
    gpu = cost.CostLine("gpu", unit_per_month=730.0, capacity_per_unit=1000.0)
    assert gpu.monthly(1, 12) == 730.0  # at least one always-on GPU
    assert gpu.monthly(1000, 12) == 730.0
    assert gpu.monthly(1001, 12) == 1460.0
    api = cost.CostLine("api", per_query=1.0)
    points = cost.crossovers(api, gpu, 12)
    assert points[0] == pytest.approx(730.0, rel=1e-6)  # the API costs more above 730 queries...
    assert len(points) > 1  # ...until the second GPU's step, where the lines cross again


def test_one_formula_for_1k_queries():
    # an API: 500 in + 200 out tokens at $0.15 / $0.60 per 1M = $0.195 per 1,000 queries
    api = cost.TokenPrice(0.15, 0.60)
    assert cost.usd_per_1k_queries(api, 500, 200) == pytest.approx(1000 * (500 * 0.15 + 200 * 0.60) / 1e6)
    # machine time: 100 tokens at 500 tokens/s on a $3.60/hour machine = 0.2 s = $0.0002 a query
    machine = cost.throughput_price(500, 3.6)
    assert machine.input_usd_per_1m == machine.output_usd_per_1m == pytest.approx(cost.cost_per_1m_tokens(500, 3.6))
    assert cost.usd_per_1k_queries(machine, 80, 20) == pytest.approx(0.2)
    assert cost.usd_per_1k_queries(machine, 80, 20) == pytest.approx(1000 * cost.self_hosted_cost_per_query(500, 3.6, 100))
    with pytest.raises(LmforgeError):
        cost.usd_per_1k_queries(api, -1, 0)


def test_plan_inference_prices_through_the_same_formula():
    from lmforge.plan import inference

    m = load_prices().model("gpt-4o-mini")
    q = inference.api_query(m, 500, 200, 1000)
    assert q["usd_per_1k_queries"] == cost.usd_per_1k_queries(cost.TokenPrice(0.15, 0.60), 500, 200)
    assert q["usd_per_query"] * 1000 == pytest.approx(q["usd_per_1k_queries"])
