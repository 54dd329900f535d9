"""The `lmforge plan` verbs: one Config dataclass and one run(cfg) each; the arithmetic lives in the modules below.

  plan train       FLOPs, GPU-hours, wall-clock, cost and memory of pretraining (training.py)
  plan finetune    the same for a finetune (full, LoRA, QLoRA) on examples x tokens x epochs
  plan inference   cost per query and per month, latency, KV cache: an API model or a self-hosted one (inference.py)
  plan breakeven   queries until a one-off cost is paid back (cost.py)
  plan compare     a scenario's options side by side, break-even volumes, a chart, a recommendation (decision.py)
  plan calibrate   a run's measured tokens/s -> $ per 1M tokens (calibrate.py)
Each prints a readable table to stdout, or JSON with --json; run() returns the result dict for callers and tests.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import command_line, opt
from lmforge.errors import LmforgeError
from lmforge.model.config import PRESETS
from lmforge.plan import calibrate as calib
from lmforge.plan import cost, decision, inference, prices, report, shape, training
from lmforge.plan.report import Report, count, gb, hours, seconds, usd

_PRICES_HELP = "YAML file extending or overriding the shipped price table (same layout as plan/prices.yaml)"
_PRESET_HELP = f"a known model shape: {', '.join(PRESETS)}"


def _emit(cfg, result: dict, rep: Report) -> dict:
    """Print the report (or JSON), naming the command that produced it."""
    result["command"] = rep.command = command_line(cfg, f"lmforge {result['verb']}")
    print(report.to_json(result) if cfg.json else rep.render(), end="" if not cfg.json else "\n")
    return result


def _gpu_line(gpu: prices.Gpu, rate: float) -> str:
    return (f"{gpu.name}: {gpu.bf16_tflops:g} TFLOP/s bf16, {gpu.memory_gb:g} GB, {gpu.bandwidth_gb_s:g} GB/s, "
            f"${rate:g}/GPU-hour")


def _memory_rows(mem: dict) -> tuple[list[str], list[list[str]]]:
    parts = ("weights", "gradients", "optimizer", "activations", "total")
    fits = f"fits in {gb(mem['usable_bytes'])} usable"
    if mem["shards"] == 1:  # one GPU: nothing to shard over
        rows = [[p, gb(mem["unsharded"][p])] for p in parts]
        return ["", "per GPU"], rows + [[fits, "yes" if mem["fits_unsharded"] else "no"]]
    rows = [[p, gb(mem["unsharded"][p]), gb(mem["sharded"][p])] for p in parts]
    rows.append([fits, "yes" if mem["fits_unsharded"] else "no", "yes" if mem["fits_sharded"] else "no"])
    return ["", "unsharded (DDP)", f"sharded over {mem['shards']} (FSDP/ZeRO-3)"], rows


# ---------------------------------------------------------------- plan train


@dataclass
class TrainPlanConfig:
    params: float | None = opt(None, "model parameters N, e.g. 7e9 (or give --preset)")
    preset: str | None = opt(None, _PRESET_HELP)
    tokens: float | None = opt(None, "training tokens D, e.g. 2e12 (default: Chinchilla-optimal, 20 per parameter)")
    gpu: str = opt("h100", "GPU from the price table (h100, h200, a100-80gb, a100-40gb, l40s, l4, a10g, t4, rtx4090, cpu-2core)")
    gpus: int = opt(8, "number of GPUs")
    mfu: float = opt(0.4, "model FLOPs utilisation: the fraction of peak bf16 FLOP/s achieved (large runs: 0.35-0.5)")
    usd_per_hour: float | None = opt(None, "$ per GPU-hour (default: the price table's)")
    seq_len: int = opt(4096, "sequence length (attention FLOPs and activation memory)")
    micro_batch: int = opt(1, "sequences per GPU per forward pass (activation memory)")
    activation_checkpointing: bool = opt(True, "recompute activations in backward (less memory)")
    prices: str | None = opt(None, _PRICES_HELP)
    json: bool = opt(False, "print JSON instead of a table")


def run_train(cfg: TrainPlanConfig) -> dict:
    table = prices.load_prices(cfg.prices)
    gpu = table.gpu(cfg.gpu)
    sh = shape.resolve(cfg.preset, cfg.params)
    optimal = training.chinchilla_tokens(sh.params)
    tokens = cfg.tokens if cfg.tokens is not None else optimal
    fl = training.training_flops(sh, tokens, cfg.seq_len, "full")
    t = training.compute_time(fl["total"], gpu, cfg.gpus, cfg.mfu, cfg.usd_per_hour)
    mem = training.memory(sh, gpu, cfg.gpus, "full", cfg.micro_batch, cfg.seq_len, cfg.activation_checkpointing)
    result = {"verb": "plan train", "model": shape.as_dict(sh), "tokens": tokens, "chinchilla_tokens": optimal,
              "tokens_per_param": tokens / sh.params, "flops": fl["total"], "flops_6nd": training.flops_6nd(sh.params, tokens),
              "flops_per_token": fl["per_token"], "attention_flops_per_token": fl["attention_per_token"],
              "gpu": gpu.key, "gpus": cfg.gpus, "mfu": cfg.mfu, **t, "memory": mem,
              "memory_advice": training.memory_advice(mem)}

    rep = Report(f"plan train: {sh.name}, {count(tokens)} tokens on {cfg.gpus} x {gpu.key}")
    flop_note = "6·N·D" if sh.estimated else (f"6 x matmul weights + attention at seq {cfg.seq_len} "
                                             f"(6·N·D alone: {count(result['flops_6nd'])})")
    rep.kv("Compute", [
        ("parameters N", count(sh.params), shape.describe(sh)),
        ("tokens D", count(tokens), f"{tokens / sh.params:.1f} tokens/param; Chinchilla-optimal: {count(optimal)}"
                                    " (20 x N)" + (" - used, as no --tokens was given" if cfg.tokens is None else "")),
        ("training FLOPs", count(fl["total"]), flop_note)])
    rep.kv("Time and cost", [
        ("GPU", _gpu_line(gpu, t["usd_per_gpu_hour"])),
        ("MFU", f"{cfg.mfu:.0%}", f"-> {t['achieved_tflops_per_gpu']:.0f} TFLOP/s per GPU"),
        ("GPU-hours", count(round(t["gpu_hours"]))),
        ("wall-clock", hours(t["wall_hours"]), f"on {cfg.gpus} GPUs, perfect scaling"),
        ("cost", usd(t["usd"]))])
    headers, rows = _memory_rows(mem)
    rep.table(f"Memory per GPU (full training, AdamW mixed precision; micro-batch {cfg.micro_batch} x {cfg.seq_len} "
              f"tokens; activation checkpointing {'on' if cfg.activation_checkpointing else 'off'})", headers, rows)
    rep.lines("", [f"-> {result['memory_advice']}", f"prices: {gpu.price_source} ({gpu.date})"])
    return _emit(cfg, result, rep)


# ---------------------------------------------------------------- plan finetune


@dataclass
class FinetunePlanConfig:
    params: float | None = opt(None, "model parameters N, e.g. 8e9 (or give --preset)")
    preset: str | None = opt(None, _PRESET_HELP)
    examples: int = opt(1000, "training examples")
    tokens_per_example: int = opt(500, "tokens per example (prompt + answer)")
    epochs: float = opt(3.0, "passes over the examples")
    method: str = opt("lora", "full: every weight; lora: adapters on bf16 frozen weights; qlora: adapters on 4-bit "
                              "frozen weights", choices=list(training.METHODS))
    lora_rank: int = opt(16, "LoRA rank (adapters on q,k,v,o,gate,up,down)")
    gpu: str = opt("a100-80gb", "GPU from the price table (a100 = a100-80gb)")
    gpus: int = opt(1, "number of GPUs")
    mfu: float = opt(0.3, "model FLOPs utilisation (finetunes on short sequences: 0.2-0.4; lower for qlora)")
    usd_per_hour: float | None = opt(None, "$ per GPU-hour (default: the price table's)")
    seq_len: int | None = opt(None, "sequence length (default: --tokens-per-example)")
    micro_batch: int = opt(4, "sequences per GPU per forward pass (activation memory)")
    activation_checkpointing: bool = opt(True, "recompute activations in backward (less memory)")
    prices: str | None = opt(None, _PRICES_HELP)
    json: bool = opt(False, "print JSON instead of a table")


def run_finetune(cfg: FinetunePlanConfig) -> dict:
    table = prices.load_prices(cfg.prices)
    gpu = table.gpu(cfg.gpu)
    sh = shape.resolve(cfg.preset, cfg.params)
    if cfg.examples < 1 or cfg.tokens_per_example < 1 or cfg.epochs <= 0:
        raise LmforgeError("--examples, --tokens-per-example and --epochs must be positive")
    seq = cfg.seq_len or cfg.tokens_per_example
    tokens = cfg.examples * cfg.tokens_per_example * cfg.epochs
    fl = training.training_flops(sh, tokens, seq, cfg.method)
    t = training.compute_time(fl["total"], gpu, cfg.gpus, cfg.mfu, cfg.usd_per_hour)
    mem = training.memory(sh, gpu, cfg.gpus, cfg.method, cfg.micro_batch, seq, cfg.activation_checkpointing,
                          cfg.lora_rank)
    result = {"verb": "plan finetune", "model": shape.as_dict(sh), "method": cfg.method, "examples": cfg.examples,
              "tokens_per_example": cfg.tokens_per_example, "epochs": cfg.epochs, "tokens": tokens,
              "flops": fl["total"], "flops_per_token": fl["per_token"], "gpu": gpu.key, "gpus": cfg.gpus,
              "mfu": cfg.mfu, **t, "memory": mem, "memory_advice": training.memory_advice(mem)}

    rep = Report(f"plan finetune: {sh.name}, {cfg.method}, {count(cfg.examples)} examples x "
                 f"{cfg.tokens_per_example} tokens x {cfg.epochs:g} epochs on {cfg.gpus} x {gpu.key}")
    k = "6" if cfg.method == "full" else "4"
    trainable = sh.params if cfg.method == "full" else mem["lora_params"]
    rep.kv("Compute", [
        ("parameters N", count(sh.params), shape.describe(sh)),
        ("trainable", count(trainable), "all weights" if cfg.method == "full" else
         f"LoRA rank {cfg.lora_rank}: {trainable / sh.params:.2%} of N"),
        ("tokens", count(tokens)),
        ("FLOPs", count(fl["total"]), f"{k}·N·D" + ("" if cfg.method == "full" else
                                                   " (no weight gradients for frozen weights)")
         + ("" if sh.estimated else " + attention"))])
    rep.kv("Time and cost", [
        ("GPU", _gpu_line(gpu, t["usd_per_gpu_hour"])),
        ("MFU", f"{cfg.mfu:.0%}"),
        ("GPU-hours", f"{t['gpu_hours']:,.2f}"),
        ("wall-clock", hours(t["wall_hours"])),
        ("cost", usd(t["usd"]))])
    headers, rows = _memory_rows(mem)
    frozen = {"full": "bf16 weights, AdamW mixed precision", "lora": "bf16 frozen weights + AdamW on adapters",
              "qlora": "4-bit frozen weights + AdamW on adapters"}[cfg.method]
    rep.table(f"Memory per GPU ({frozen}; micro-batch {cfg.micro_batch} x {seq} tokens)", headers, rows)
    rep.lines("", [f"-> {result['memory_advice']}"])
    return _emit(cfg, result, rep)


# ---------------------------------------------------------------- plan inference


@dataclass
class InferencePlanConfig:
    model: str | None = opt(None, "an API model in the price table (gpt-4, gpt-4o, gpt-4o-mini, claude-3.5-sonnet, ...)"
                                  " or a model preset to self-host (llama-3-8b, ...)")
    params: float | None = opt(None, "self-host a model of this many parameters (Llama-like shape estimated)")
    queries_per_month: float = opt(100000.0, "queries per month")
    input_tokens: float = opt(500.0, "input (prompt) tokens per query")
    output_tokens: float = opt(500.0, "output (generated) tokens per query")
    tokens_per_s: float | None = opt(None, "measured output tokens/s: an API's output speed, or a self-hosted "
                                           "server's aggregate decode throughput (replaces the estimate)")
    first_token_s: float = opt(0.5, "API time to first token, seconds (used with --tokens-per-s)")
    gpu: str = opt("l4", "self-hosting GPU from the price table")
    batch: int = opt(1, "self-hosting: concurrent sequences per GPU")
    weight_bits: int = opt(16, "self-hosting: bits per weight: 16, 8 or 4")
    context: int | None = opt(None, "self-hosting: KV-cache context length per sequence (default: input + output)")
    usd_per_hour: float | None = opt(None, "self-hosting: $ per GPU-hour (default: the price table's)")
    bandwidth_efficiency: float = opt(0.6, "self-hosting: fraction of peak memory bandwidth decode achieves")
    mfu: float = opt(0.4, "self-hosting: fraction of peak FLOP/s for prefill and compute-bound decode")
    always_on: bool = opt(True, "self-hosting: pay for whole always-on GPUs (730 h/month), not just GPU time used")
    prices: str | None = opt(None, _PRICES_HELP)
    json: bool = opt(False, "print JSON instead of a table")


def run_inference(cfg: InferencePlanConfig) -> dict:
    table = prices.load_prices(cfg.prices)
    name = cfg.model
    if name and table.has_model(name):
        if cfg.params:
            raise LmforgeError(f"--model {name} is an API model; --params is for self-hosting, drop one of them")
        return _inference_api(cfg, table.model(name))
    if name and not shape.is_preset(name):
        raise LmforgeError(f"'{name}' is neither an API model in the price table ({', '.join(table.api_models)}) "
                           f"nor a model preset ({', '.join(PRESETS)}); or self-host by size with --params N")
    if not name and not cfg.params:
        raise LmforgeError("say which model: --model NAME (an API model or a preset to self-host) or --params N")
    return _inference_self_hosted(cfg, table, shape.resolve(name, cfg.params))


def _inference_api(cfg: InferencePlanConfig, model: prices.ApiModel) -> dict:
    q = inference.api_query(model, cfg.input_tokens, cfg.output_tokens, cfg.queries_per_month, cfg.tokens_per_s,
                            cfg.first_token_s)
    result = {"verb": "plan inference", **q}
    rep = Report(f"plan inference: {model.name} ({model.provider}), {count(cfg.queries_per_month)} queries/month")
    rep.kv("Prices", [
        ("input", f"${model.input_usd_per_1m:g} per 1M tokens", f"(${model.input_usd_per_1m / 1000:g} per 1K)"),
        ("output", f"${model.output_usd_per_1m:g} per 1M tokens", f"(${model.output_usd_per_1m / 1000:g} per 1K)"),
        ("as of", model.date, model.source)] + ([("note", model.note)] if model.note else []))
    rows = [("tokens per query", f"{count(cfg.input_tokens)} in + {count(cfg.output_tokens)} out"),
            ("cost per query", usd(q["usd_per_query"])),
            ("per 1,000 queries", usd(q["usd_per_1k_queries"])),
            ("per month", usd(q["usd_per_month"]), f"at {count(cfg.queries_per_month)} queries")]
    if q["latency_s"] is not None:
        rows.append(("latency", seconds(q["latency_s"]), f"{cfg.first_token_s:g} s to first token + "
                                                         f"{count(cfg.output_tokens)} tokens at {cfg.tokens_per_s:g}/s"))
    else:
        rows.append(("latency", "-", "give --tokens-per-s (the API's output speed) to estimate it"))
    rep.kv("Cost", rows)
    return _emit(cfg, result, rep)


def _inference_self_hosted(cfg: InferencePlanConfig, table: prices.PriceTable, sh: shape.Shape) -> dict:
    gpu = table.gpu(cfg.gpu)
    q = inference.self_hosted_query(sh, gpu, cfg.input_tokens, cfg.output_tokens, cfg.queries_per_month,
                                    batch=cfg.batch, weight_bits=cfg.weight_bits, tokens_per_s=cfg.tokens_per_s,
                                    usd_per_hour=cfg.usd_per_hour, bandwidth_efficiency=cfg.bandwidth_efficiency,
                                    mfu=cfg.mfu, context=cfg.context, always_on=cfg.always_on)
    result = {"verb": "plan inference", "model_shape": shape.as_dict(sh), **q}
    rep = Report(f"plan inference: self-hosted {sh.name} on {gpu.key}, {count(cfg.queries_per_month)} queries/month")
    rep.kv("Model and GPU", [("model", shape.describe(sh)), ("GPU", _gpu_line(gpu, q["usd_per_gpu_hour"]))])
    rep.kv("Memory", [
        ("weights", gb(q["weights_bytes"]), f"{cfg.weight_bits}-bit"),
        ("KV cache", gb(q["kv_bytes_batch"]), f"{count(q['context'])} tokens x batch {cfg.batch} "
                                             f"({gb(q['kv_bytes_per_sequence'])} per sequence)"),
        ("total", gb(q["memory_bytes"]), ("fits" if q["fits"] else "does NOT fit") + f" in {gb(gpu.memory_bytes)}"
         + (f"; at most {q['max_batch_at_context']} sequences of this context fit" if q["max_batch_at_context"]
            else "; the weights alone leave no room"))])
    rep.kv("Speed", [
        ("batch-1 decode bound", f"{q['bandwidth_bound_tokens_per_s']:,.1f} tokens/s",
         "memory bandwidth / weight bytes per token"),
        ("decode", f"{q['decode_tokens_per_s']:,.1f} tokens/s", f"{q['throughput_source']}, batch {cfg.batch}"),
        ("prefill", f"{q['prefill_tokens_per_s']:,.0f} tokens/s", f"compute-bound at {cfg.mfu:.0%} MFU"),
        ("latency", seconds(q["latency_s"]), f"first token {seconds(q['first_token_s'])}")])
    rep.kv("Cost", [
        ("GPU time per query", seconds(q["gpu_seconds_per_query"])),
        ("cost per query", usd(q["usd_per_query"]), "GPU time used"),
        ("per 1,000 queries", usd(q["usd_per_1k_queries"])),
        ("per month, GPU time used", usd(q["usd_per_month_per_use"]), f"{q['gpu_hours_per_month']:,.1f} GPU-hours"),
        ("per month, always-on", usd(q["usd_per_month_always_on"]),
         f"{q['gpus_always_on']} GPU(s) x 730 h; one GPU serves {count(round(q['queries_per_gpu_month']))} queries/month")])
    warnings = []
    if not q["fits"]:
        warnings.append(f"warning: the model does not fit one {gpu.key}; the figures above assume it did. Use "
                        "--weight-bits 8 or 4, a smaller --batch or --context, or a GPU with more memory "
                        "(splitting a model over several GPUs is not modelled)")
    if cfg.tokens_per_s and cfg.tokens_per_s > q["bandwidth_bound_tokens_per_s"] * cfg.batch:
        warnings.append(f"warning: the measured {cfg.tokens_per_s:g} tokens/s beats the memory-bandwidth bound of "
                        f"{gpu.key} x batch {cfg.batch}; check --gpu, --weight-bits and --batch")
    result["warnings"] = warnings
    if warnings:
        rep.lines("", warnings)
    return _emit(cfg, result, rep)


# ---------------------------------------------------------------- plan breakeven


@dataclass
class BreakevenPlanConfig:
    one_off: float = opt(0.0, "one-off cost of the new option B in $, e.g. a finetune")
    saving_per_query: float | None = opt(None, "$ saved per query by B (or give --per-query-a and --per-query-b)")
    per_query_a: float | None = opt(None, "$ per query of the current option A")
    per_query_b: float | None = opt(None, "$ per query of the new option B")
    one_off_a: float = opt(0.0, "one-off cost of option A in $")
    queries_per_month: float | None = opt(None, "expected queries per month: turns the break-even into months")
    json: bool = opt(False, "print JSON instead of a table")


def run_breakeven(cfg: BreakevenPlanConfig) -> dict:
    if cfg.saving_per_query is not None and (cfg.per_query_a is not None or cfg.per_query_b is not None):
        raise LmforgeError("give either --saving-per-query, or --per-query-a and --per-query-b, not both")
    if cfg.saving_per_query is not None:
        saving = cfg.saving_per_query
    elif cfg.per_query_a is not None and cfg.per_query_b is not None:
        saving = cfg.per_query_a - cfg.per_query_b
    else:
        raise LmforgeError("say what B saves: --saving-per-query 0.02, or both --per-query-a and --per-query-b")
    extra = cfg.one_off - cfg.one_off_a
    if extra < 0:
        raise LmforgeError("B's one-off cost is below A's: B is cheaper up front, and the question is whether A ever "
                           "catches up; swap the options (A <-> B)")
    q = cost.breakeven(extra, saving)
    result = {"verb": "plan breakeven", "one_off": cfg.one_off, "one_off_a": cfg.one_off_a,
              "saving_per_query": saving, "breakeven_queries": q, "queries_per_month": cfg.queries_per_month,
              "breakeven_months": (q / cfg.queries_per_month if cfg.queries_per_month else None)}
    rep = Report("plan breakeven")
    rows = [("one-off cost", usd(extra), "of B" + (f" beyond A's {usd(cfg.one_off_a)}" if cfg.one_off_a else ""))]
    if cfg.per_query_a is not None:
        rows += [("per query, A", usd(cfg.per_query_a)), ("per query, B", usd(cfg.per_query_b))]
    rows.append(("saving per query", usd(saving)))
    if saving <= 0:
        rows.append(("break-even", "never", "B saves nothing per query, so its one-off cost is never paid back"))
    else:
        rows.append(("break-even", f"{count(round(q))} queries", f"{usd(extra)} / {usd(saving)}"))
        if cfg.queries_per_month:
            rows.append(("", f"{q / cfg.queries_per_month:,.1f} months", f"at {count(cfg.queries_per_month)} "
                                                                          "queries/month"))
    rep.kv("", rows)
    return _emit(cfg, result, rep)


# ---------------------------------------------------------------- plan compare


@dataclass
class ComparePlanConfig:
    scenario: str | None = opt(None, "scenario YAML: workload, needs and options (see configs/scenario-example.yaml)")
    measured: str | None = opt(None, "an `lmforge compare` --out directory: every variant becomes an option "
                                     "(kind: measured), with its measured cost, latency and accuracy")
    usd_per_hour: float | None = opt(None, "with --measured: reprice local variants at this $/hour (default: compare's)")
    queries_per_month: float | None = opt(None, "override the scenario's queries per month")
    months: float | None = opt(None, "override the scenario's horizon for spreading one-off costs")
    chart: str | None = opt("plan-compare.png", "write the cost-against-volume chart here (PNG); 'none' to skip")
    prices: str | None = opt(None, _PRICES_HELP)
    json: bool = opt(False, "print JSON instead of a table")


def run_compare(cfg: ComparePlanConfig) -> dict:
    if not cfg.scenario and not cfg.measured:
        raise LmforgeError("give --scenario FILE.yaml (configs/scenario-example.yaml shows the layout) and/or "
                           "--measured DIR (the --out of `lmforge compare`)")
    table = prices.load_prices(cfg.prices)
    # without a scenario the needs are unknown: no variety is assumed (the rules about it stay silent)
    sc = decision.load_scenario(cfg.scenario) if cfg.scenario else \
        decision.Scenario(name="measured", options=[], needs=decision.Needs(variety=""))
    if cfg.measured:
        sc.options = list(sc.options) + decision.measured_options(cfg.measured, cfg.usd_per_hour)
    if cfg.queries_per_month is not None:
        sc.queries_per_month = cfg.queries_per_month
    if cfg.months is not None:
        if cfg.months <= 0:
            raise LmforgeError(f"--months must be positive, got {cfg.months}")
        sc.months = cfg.months
    options = [decision.build_option(raw, sc, table, i) for i, raw in enumerate(sc.options)]
    names = [o.name for o in options]
    if len(set(names)) != len(names):
        raise LmforgeError("scenario options need distinct names")
    rec = decision.recommend(sc, options)
    pairs = decision.pairwise_breakeven(options, sc.months)
    q, m = sc.queries_per_month, sc.months
    chart_path = None
    if cfg.chart and cfg.chart.lower() != "none":
        from lmforge.plan.chart import cost_chart

        chart_path = str(cost_chart([o.line for o in options], m, cfg.chart, volume=q, title=f"{sc.name}: monthly cost"))

    opts_json = []
    for o in options:
        opts_json.append({"name": o.name, "kind": o.kind, "one_off": o.line.one_off, "per_month": o.line.per_month,
                          "per_query": o.line.per_query, "unit_per_month": o.line.unit_per_month,
                          "capacity_per_unit": o.line.capacity_per_unit, "usd_per_month_at_volume": o.line.monthly(q, m),
                          "usd_per_query_at_volume": o.line.monthly(q, m) / q if q else None,
                          "latency_s": o.latency_s, "finetuned": o.finetuned, "rag": o.rag, "local": o.local,
                          "from_scratch": o.from_scratch, "details": o.details,
                          "measured": None if o.measured is None else
                          {k: v for k, v in o.measured.items() if k != "paired"}})
    result = {"verb": "plan compare", "scenario": sc.name, "queries_per_month": q, "months": m,
              "input_tokens": sc.input_tokens, "output_tokens": sc.output_tokens,
              "needs": vars(sc.needs), "options": opts_json, "breakeven": pairs, "recommendation": rec,
              "chart": chart_path}

    tokens = "" if all(o.kind == "measured" for o in options) else \
        f", {count(sc.input_tokens)} in + {count(sc.output_tokens)} out tokens"
    rep = Report(f"plan compare: {sc.name}, {count(q)} queries/month{tokens}, one-offs over {m:g} months")
    rows = []
    for o in options:
        monthly = o.line.monthly(q, m)
        rows.append([o.name, o.kind, usd(o.line.one_off), usd(o.line.per_query) if o.line.per_query else "-",
                     usd(o.line.per_month + o.line.unit_per_month * o.line.units(q)), usd(monthly),
                     usd(monthly / q * 1000) if q else "-", seconds(o.latency_s),
                     f"{o.measured['accuracy']:.3f}" if o.measured else "-"])
    rep.table("Options at this volume", ["option", "kind", "one-off", "per query", "fixed/month", "total/month",
                                         "per 1K queries", "latency", "accuracy"], rows)
    be_rows = []
    for p in pairs:
        if not p["queries_per_month"]:
            be_rows.append([p["a"], p["b"], "never", "-"])
            continue
        for x, winner in list(zip(p["queries_per_month"], p["cheaper_above"]))[:3]:
            be_rows.append([p["a"], p["b"], count(round(x)), winner])
    rep.table("Break-even volumes (queries/month)", ["option A", "option B", "break-even", "cheaper above it"], be_rows)
    lines = [f"-> {rec['recommended']}"] + [f"   - {r}" for r in rec["reasons"]]
    for w in rec["why_not"]:
        lines.append(f"   not {w['option']}: " + "; ".join(w["reasons"]))
    rep.lines("Recommendation", lines)
    notes = [f"{o.name}: {w}" for o in options for w in o.details.get("warnings", [])]
    if chart_path:
        notes.append(f"chart: {chart_path}")
    notes.append(f"prices: {', '.join(table.files)} (table dated {table.date})")
    rep.lines("", notes)
    return _emit(cfg, result, rep)


# ---------------------------------------------------------------- plan calibrate


@dataclass
class CalibratePlanConfig:
    run: str | None = opt(None, "run directory holding metrics.jsonl (e.g. runs/NAME), or the --out of "
                                "`lmforge compare` (results.json: each variant's serving speed and cost)")
    usd_per_hour: float | None = opt(None, "what this machine costs per hour, $ (or give --gpu; a compare run "
                                           "defaults to the rate it was priced at)")
    gpu: str | None = opt(None, "take the hourly price of this GPU from the price table instead")
    tokens: float | None = opt(None, "also project the time and cost of this many tokens at the measured speed")
    prices: str | None = opt(None, _PRICES_HELP)
    json: bool = opt(False, "print JSON instead of a table")


def run_calibrate(cfg: CalibratePlanConfig) -> dict:
    if not cfg.run:
        raise LmforgeError("give --run runs/NAME (a run directory with metrics.jsonl)")
    rate = cfg.usd_per_hour
    if rate is None and cfg.gpu:
        rate = prices.load_prices(cfg.prices).gpu(cfg.gpu).usd_per_hour
    if (Path(cfg.run) / "results.json").is_file() and not (Path(cfg.run) / "metrics.jsonl").is_file():
        return _calibrate_compare(cfg, rate)
    if rate is None:
        if not cfg.gpu:
            raise LmforgeError("say what the machine costs: --usd-per-hour 0.10, or --gpu NAME from the price table")
        rate = prices.load_prices(cfg.prices).gpu(cfg.gpu).usd_per_hour
    res = calib.calibrate(cfg.run, rate, cfg.tokens)
    result = {"verb": "plan calibrate", **res}
    rep = Report(f"plan calibrate: {res['run']}")
    rows = [("records", f"{res['records']} ({res['timed_records']} timed, {res['warmup_dropped']} dropped as warm-up)"),
            ("steps", count(res["steps"])), ("tokens seen", count(res["tokens_seen"])),
            ("final loss", f"{res['final_loss']:.4f}" if res["final_loss"] is not None else "-"),
            ("tokens/s", f"{res['tokens_per_s']:,.1f}", f"median (mean {res['tokens_per_s_mean']:,.1f}, range "
                                                       f"{res['tokens_per_s_min']:,.1f}-{res['tokens_per_s_max']:,.1f})"),
            ("MFU", f"{res['mfu']:.1%}" if res["mfu"] is not None else "-")]
    if res["model"]:
        rows.append(("model", f"{count(res['model']['params'])} params",
                     f"{res['model']['source']}; {res['model']['model_tflops_achieved']:.3g} TFLOP/s achieved (6N)"))
    rep.kv("Measured", rows)
    cost_rows = [("machine", f"${rate:g}/hour"), ("tokens per hour", count(round(res["tokens_per_hour"]))),
                 ("cost per 1M tokens", usd(res["usd_per_1m_tokens"]))]
    if "projection" in res:
        p = res["projection"]
        cost_rows.append((f"{count(p['tokens'])} tokens", f"{hours(p['hours'])}, {usd(p['usd'])}"))
    rep.kv("Cost at this speed", cost_rows)
    if res["lineage"] is not None:
        rep.lines("", ["final/lmforge.json: " + ", ".join(sorted(res["lineage"])) if isinstance(res["lineage"], dict)
                       else "final/lmforge.json present"])
    return _emit(cfg, result, rep)


def _calibrate_compare(cfg: CalibratePlanConfig, rate: float | None) -> dict:
    res = calib.calibrate_compare(cfg.run, rate)
    result = {"verb": "plan calibrate", **res}
    rep = Report(f"plan calibrate: {res['run']} (a compare run on {res['task']}, {res['n']} items)")
    rows = []
    for v in res["variants"]:
        tps = "-" if v["tokens_per_s"] is None else (f"{v['tokens_per_s']:,.1f} ({v['tokens_per_s_range'][0]:,.1f}-"
                                                      f"{v['tokens_per_s_range'][1]:,.1f})")
        k = "-" if v["usd_per_1k"] is None else usd(v["usd_per_1k"]) + (
            f" ({usd(v['usd_per_1k_range'][0])}-{usd(v['usd_per_1k_range'][1])})" if v["usd_per_1k_range"] else "")
        rows.append([v["name"], v["kind"], f"{v['accuracy']:.3f}", tps, f"{v['tokens_in'] + v['tokens_out']:,.1f}",
                     usd(v["usd_per_1m_tokens"]), k, v["price_basis"]])
    rep.table("Measured (median, range over the timing passes)", ["variant", "kind", "accuracy", "tokens/machine-s",
                                                                 "tokens/query", "$ / 1M tokens", "$ / 1k queries",
                                                                 "basis"], rows)
    t = res["timing"]
    rep.lines("", [f"timing: {t.get('threads')} thread(s), {t.get('passes')} passes over {t.get('items')} items; "
                   f"load average before {t.get('loadavg_before')}, after {t.get('loadavg_after')}",
                   f"measured by: {res['command']}",
                   "feed it to the decision: lmforge plan compare --measured " + shlex.quote(res["run"])])
    return _emit(cfg, result, rep)
