"""Inference estimates: what a query costs and how long it takes, from an API's prices or a self-hosted GPU.

API: input and output tokens at their own list prices (cost.api_cost_per_query); latency only when you give the
model's output speed (--tokens-per-s) and time to first token.
Self-hosted, per GPU (single-GPU serving; a model that does not fit one GPU is reported as such):
  - prefill is compute-bound: prompt FLOPs (accounting.flops_prefill) at peak x MFU;
  - decode reads every weight once per step plus each sequence's KV cache, and does 2 x matmul weights FLOPs per
    sequence, so a step takes max(bytes / (bandwidth x efficiency), FLOPs / (peak x MFU)); batch B sequences
    share the weight reads. At batch 1 this is the memory-bandwidth bound (bandwidth / weight bytes per token);
  - a measured --tokens-per-s (aggregate decode throughput across the batch) replaces the decode estimate;
  - GPU time per query = prompt / prefill speed + output / aggregate decode speed; a query's latency is its
    prefill plus its output at the per-sequence speed (aggregate / batch);
  - a month costs either the GPU time used (per use, e.g. serverless) or whole always-on GPUs (730 h each),
    as many as the volume needs.
KV cache: accounting.kv_cache_bytes for context x batch; weights at --weight-bits (4-bit adds 3% for scales).
"""

from __future__ import annotations

import math

from lmforge.errors import LmforgeError
from lmforge.model import accounting
from lmforge.plan import cost
from lmforge.plan.prices import ApiModel, Gpu
from lmforge.plan.shape import Shape
from lmforge.plan.training import USABLE_MEMORY_FRACTION


def api_query(model: ApiModel, input_tokens: float, output_tokens: float, queries_per_month: float,
              tokens_per_s: float | None = None, first_token_s: float = 0.5) -> dict:
    """Cost per query, per 1,000 queries and per month for an API model; latency if its speed is given."""
    _check_tokens(input_tokens, output_tokens, queries_per_month)
    price = cost.TokenPrice(model.input_usd_per_1m, model.output_usd_per_1m, f"{model.name} list price")
    per_1k = cost.usd_per_1k_queries(price, input_tokens, output_tokens)
    per_query = per_1k / 1000
    out = {"kind": "api", "model": model.name, "provider": model.provider,
           "input_usd_per_1m": model.input_usd_per_1m, "output_usd_per_1m": model.output_usd_per_1m,
           "price_date": model.date, "price_source": model.source, "note": model.note,
           "input_tokens": input_tokens, "output_tokens": output_tokens, "queries_per_month": queries_per_month,
           "usd_per_query": per_query, "usd_per_1k_queries": per_1k,
           "usd_per_month": per_query * queries_per_month, "latency_s": None}
    if tokens_per_s:
        out["latency_s"] = first_token_s + output_tokens / tokens_per_s
        out["tokens_per_s"] = tokens_per_s
        out["first_token_s"] = first_token_s
    return out


def bytes_per_weight(weight_bits: int) -> float:
    if weight_bits not in (4, 8, 16, 32):
        raise LmforgeError(f"--weight-bits must be 4, 8, 16 or 32, got {weight_bits}")
    return weight_bits / 8 * (1.03 if weight_bits == 4 else 1.0)  # 4-bit: ~3% more for the group scales


def decode_throughput(shape: Shape, gpu: Gpu, batch: int, context: float, weight_bits: int = 16,
                      bandwidth_efficiency: float = 0.6, mfu: float = 0.4) -> dict[str, float]:
    """Estimated decode tokens/s at `batch` concurrent sequences of average `context`, and the batch-1 bound."""
    bpw = bytes_per_weight(weight_bits)
    weights_read = accounting.decode_bytes_per_token(shape.cfg, bpw, context=0)
    kv_read = accounting.kv_bytes_per_token(shape.cfg) * context
    mem_s = (weights_read + batch * kv_read) / (gpu.bandwidth_bytes_s * bandwidth_efficiency)
    compute_s = batch * 2 * accounting.matmul_params(shape.cfg) / (gpu.peak_flops * mfu)
    step_s = max(mem_s, compute_s)
    return {"aggregate_tokens_per_s": batch / step_s, "per_sequence_tokens_per_s": 1 / step_s,
            "bandwidth_bound_tokens_per_s": gpu.bandwidth_bytes_s / weights_read,
            "weight_bytes_per_token": weights_read, "bound": "memory" if mem_s >= compute_s else "compute"}


def self_hosted_query(shape: Shape, gpu: Gpu, input_tokens: float, output_tokens: float, queries_per_month: float,
                      batch: int = 1, weight_bits: int = 16, tokens_per_s: float | None = None,
                      usd_per_hour: float | None = None, bandwidth_efficiency: float = 0.6, mfu: float = 0.4,
                      context: int | None = None, always_on: bool = True) -> dict:
    """Throughput, latency, memory and cost of serving `shape` on one `gpu` type."""
    _check_tokens(input_tokens, output_tokens, queries_per_month)
    if batch < 1:
        raise LmforgeError(f"--batch must be at least 1, got {batch}")
    if not 0 < bandwidth_efficiency <= 1 or not 0 < mfu <= 1:
        raise LmforgeError("--bandwidth-efficiency and --mfu are fractions between 0 and 1")
    if tokens_per_s is not None and tokens_per_s <= 0:
        raise LmforgeError(f"--tokens-per-s must be positive, got {tokens_per_s}")
    rate = gpu.usd_per_hour if usd_per_hour is None else usd_per_hour
    cfg = shape.cfg
    context = int(context or input_tokens + output_tokens)

    # memory: weights + KV cache for `batch` sequences of `context` tokens
    weights = accounting.n_params(cfg) * bytes_per_weight(weight_bits)
    kv_per_seq = accounting.kv_cache_bytes(cfg, context, 1)
    usable = gpu.memory_bytes * USABLE_MEMORY_FRACTION
    max_batch = max(0, math.floor((usable - weights) / kv_per_seq)) if kv_per_seq else 0

    # speed
    decode = decode_throughput(shape, gpu, batch, input_tokens + output_tokens / 2, weight_bits,
                               bandwidth_efficiency, mfu)
    measured = tokens_per_s is not None
    agg = tokens_per_s if measured else decode["aggregate_tokens_per_s"]
    per_seq = agg / batch
    prefill_tps = (gpu.peak_flops * mfu * input_tokens / accounting.flops_prefill(cfg, int(input_tokens))
                   if input_tokens else math.inf)
    prefill_s = input_tokens / prefill_tps if input_tokens else 0.0
    gpu_s = prefill_s + output_tokens / agg  # GPU time one query occupies, batch-shared
    # prompt tokens at the prefill speed, output tokens at the decode speed
    per_1k = cost.usd_per_1k_queries(cost.throughput_price(prefill_tps, rate, output_tokens_per_s=agg),
                                     input_tokens, output_tokens)
    per_query = per_1k / 1000

    # a month
    gpu_hours = queries_per_month * gpu_s / 3600
    gpus_needed = max(1, math.ceil(gpu_hours / cost.HOURS_PER_MONTH - 1e-9))
    per_use = per_query * queries_per_month
    dedicated = gpus_needed * cost.HOURS_PER_MONTH * rate
    return {"kind": "self_hosted", "model": shape.name, "params": shape.params, "estimated_shape": shape.estimated,
            "gpu": gpu.key, "usd_per_gpu_hour": rate, "weight_bits": weight_bits, "batch": batch,
            "context": context, "input_tokens": input_tokens, "output_tokens": output_tokens,
            "queries_per_month": queries_per_month,
            "weights_bytes": weights, "kv_bytes_per_sequence": kv_per_seq, "kv_bytes_batch": kv_per_seq * batch,
            "memory_bytes": weights + kv_per_seq * batch, "gpu_memory_bytes": gpu.memory_bytes,
            "fits": weights + kv_per_seq * batch <= usable, "max_batch_at_context": max_batch,
            "throughput_source": "measured (--tokens-per-s)" if measured else f"estimated ({decode['bound']}-bound)",
            "bandwidth_bound_tokens_per_s": decode["bandwidth_bound_tokens_per_s"],
            "decode_tokens_per_s": agg, "per_sequence_tokens_per_s": per_seq, "prefill_tokens_per_s": prefill_tps,
            "first_token_s": prefill_s, "latency_s": prefill_s + output_tokens / per_seq,
            "gpu_seconds_per_query": gpu_s, "usd_per_query": per_query, "usd_per_1k_queries": per_1k,
            "queries_per_gpu_month": cost.HOURS_PER_MONTH * 3600 / gpu_s,
            "gpu_hours_per_month": gpu_hours, "gpus_always_on": gpus_needed,
            "usd_per_month_per_use": per_use, "usd_per_month_always_on": dedicated,
            "always_on": always_on, "usd_per_month": dedicated if always_on else per_use}


def _check_tokens(input_tokens: float, output_tokens: float, queries_per_month: float) -> None:
    if input_tokens < 0 or output_tokens < 0 or queries_per_month < 0:
        raise LmforgeError("token counts and --queries-per-month cannot be negative")
    if output_tokens == 0 and input_tokens == 0:
        raise LmforgeError("a query needs some tokens: set --input-tokens and/or --output-tokens")
