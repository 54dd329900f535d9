"""Inference estimates: API cost and latency, the memory-bandwidth bound, KV-cache memory, self-hosted cost."""

import pytest

from lmforge.errors import LmforgeError
from lmforge.model import accounting
from lmforge.plan import cost, inference, shape
from lmforge.plan.commands import InferencePlanConfig, run_inference
from lmforge.plan.prices import load_prices


def test_api_inference_command_worked_example(capsys):
    res = run_inference(InferencePlanConfig(model="gpt-4", queries_per_month=100_000, input_tokens=500,
                                            output_tokens=500))
    out = capsys.readouterr().out
    assert res["usd_per_query"] == pytest.approx(0.045)
    assert res["usd_per_month"] == pytest.approx(4500.0)
    assert "$0.045" in out and "$4,500.00" in out and "historical" in out


def test_api_latency_from_speed():
    model = load_prices().model("gpt-4o-mini")
    q = inference.api_query(model, 1000, 200, 10, tokens_per_s=100, first_token_s=0.5)
    assert q["latency_s"] == pytest.approx(2.5)
    assert q["usd_per_1k_queries"] == pytest.approx(1000 * (1000 * 0.15 + 200 * 0.6) / 1e6)


def test_batch1_decode_is_bandwidth_over_weight_bytes():
    table = load_prices()
    h100 = table.gpu("h100")
    sh = shape.resolve("llama-2-7b", None)
    d = inference.decode_throughput(sh, h100, batch=1, context=0, bandwidth_efficiency=1.0)
    bound = h100.bandwidth_bytes_s / accounting.decode_bytes_per_token(sh.cfg, 2)
    assert d["bandwidth_bound_tokens_per_s"] == pytest.approx(bound)
    assert d["aggregate_tokens_per_s"] == pytest.approx(bound)  # batch 1 at full efficiency is the bound itself
    assert 200 < bound < 280  # ~13.5 GB of bf16 weights over 3.35 TB/s
    # 4-bit weights read about a quarter of the bytes
    d4 = inference.decode_throughput(sh, h100, batch=1, context=0, weight_bits=4, bandwidth_efficiency=1.0)
    assert d4["aggregate_tokens_per_s"] == pytest.approx(bound * 2 / 0.515, rel=0.05)
    # batching shares the weight reads: more aggregate, less per sequence
    d16 = inference.decode_throughput(sh, h100, batch=16, context=1000)
    assert d16["aggregate_tokens_per_s"] > 8 * d["aggregate_tokens_per_s"] * 0.6


def test_self_hosted_memory_and_cost():
    table = load_prices()
    sh = shape.resolve("llama-3-8b", None)
    q = inference.self_hosted_query(sh, table.gpu("l4"), 500, 500, 100_000, batch=4, context=8192)
    assert q["kv_bytes_per_sequence"] == accounting.kv_cache_bytes(sh.cfg, 8192, 1)
    assert q["kv_bytes_batch"] == 4 * q["kv_bytes_per_sequence"]  # 1 GiB per 8K-token sequence for Llama 3 8B
    assert q["kv_bytes_per_sequence"] == 32 * 2 * 8 * 128 * 2 * 8192
    assert q["fits"]
    # the per-query cost is the GPU time it occupies at the hourly price
    expected = (cost.self_hosted_cost_per_query(q["decode_tokens_per_s"], q["usd_per_gpu_hour"], 500)
                + cost.self_hosted_cost_per_query(q["prefill_tokens_per_s"], q["usd_per_gpu_hour"], 500))
    assert q["usd_per_query"] == pytest.approx(expected)
    assert q["usd_per_month"] == q["usd_per_month_always_on"] == q["gpus_always_on"] * 730 * q["usd_per_gpu_hour"]
    # a measured throughput replaces the estimate
    m = inference.self_hosted_query(sh, table.gpu("l4"), 500, 500, 100_000, batch=4, tokens_per_s=400)
    assert m["decode_tokens_per_s"] == 400 and "measured" in m["throughput_source"]
    big = inference.self_hosted_query(shape.resolve("llama-2-70b", None), table.gpu("l4"), 500, 500, 10)
    assert not big["fits"]


def test_inference_errors(capsys):
    with pytest.raises(LmforgeError, match="neither an API model"):
        run_inference(InferencePlanConfig(model="no-such-model"))
    with pytest.raises(LmforgeError, match="say which model"):
        run_inference(InferencePlanConfig())
    with pytest.raises(LmforgeError, match="weight-bits"):
        run_inference(InferencePlanConfig(model="llama-3-8b", weight_bits=3))
    res = run_inference(InferencePlanConfig(params=70e9, gpu="l4", json=True))
    assert res["warnings"] and "does not fit" in res["warnings"][0]
