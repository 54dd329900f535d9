"""Calibration from measured runs: this machine's tokens/s -> $ per 1M tokens and $ per 1,000 queries.

Two kinds of measured run:
  - a training run (runs/NAME/metrics.jsonl): its training throughput, `calibrate()`;
  - a compare run (the --out of `lmforge compare`, results.json): each variant's serving throughput, accuracy and
    the paired tests between variants, `calibrate_compare()`; `plan compare --measured DIR` turns its variants
    into options and `plan calibrate --run DIR` prints them. Every $ figure goes through
    cost.usd_per_1k_queries, the formula compare itself used, so plan and compare agree to the cent.

A training run: reads runs/NAME/metrics.jsonl (one JSON object per logging step; the records used carry `tokens_per_s`, and
may carry step, tokens, loss, mfu; records without tokens_per_s, such as validation lines, are skipped), plus
config.yaml and final/lmforge.json when present. The first timed record is dropped as warm-up when there are three
or more (it includes start-up and compilation); the measured speed is the median of the rest, which one slow step
(a checkpoint save) does not move. A truncated last line (a run killed mid-write) is skipped with a warning.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import yaml

from lmforge.errors import LmforgeError
from lmforge.model import accounting
from lmforge.model.config import PRESETS, ModelConfig
from lmforge.plan import cost


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise LmforgeError(f"{path} does not exist; point --run at a run directory holding metrics.jsonl "
                           "(written by `lmforge pretrain` / `lmforge finetune`)")
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                print(f"warning: {path}:{i} is cut short (run interrupted?); skipped", file=sys.stderr)
                continue
            raise LmforgeError(f"{path}:{i} is not a JSON object; metrics.jsonl holds one JSON object per line") from None
        if not isinstance(rec, dict):
            raise LmforgeError(f"{path}:{i} is not a JSON object; metrics.jsonl holds one JSON object per line")
        records.append(rec)
    return records


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) or math.isinf(v):
        return None
    return float(v)


def model_from_config(config: dict) -> tuple[ModelConfig | None, str]:
    """The model shape a run's config.yaml describes, if it names a preset or holds a model section."""
    fields = set(ModelConfig.__dataclass_fields__)
    model = config.get("model")
    for key in ("preset", "model_preset"):
        for where in (config, model if isinstance(model, dict) else {}):
            name = where.get(key)
            if isinstance(name, str) and name in PRESETS:
                base = PRESETS[name]
                over = {k: v for k, v in (model or {}).items() if k in fields} if isinstance(model, dict) else {}
                return base.replace(**over), f"preset {name}" + (" with overrides" if over else "")
    if isinstance(model, str) and model in PRESETS:
        return PRESETS[model].replace(), f"preset {model}"
    if isinstance(model, dict) and {"hidden_size", "n_layers"} <= set(model):
        try:
            cfg = ModelConfig(**{k: v for k, v in model.items() if k in fields})
            return cfg, "config.yaml model section"
        except TypeError:
            return None, ""
    return None, ""


def calibrate(run_dir: str | Path, usd_per_hour: float, tokens: float | None = None) -> dict:
    """Measured throughput of a run and what a token costs at `usd_per_hour`."""
    run = Path(run_dir)
    if not run.is_dir():
        raise LmforgeError(f"run directory {run} does not exist; give --run runs/NAME")
    if usd_per_hour < 0:
        raise LmforgeError(f"--usd-per-hour cannot be negative, got {usd_per_hour}")
    records = read_metrics(run / "metrics.jsonl")
    timed = [r for r in records if _number(r.get("tokens_per_s")) and _number(r.get("tokens_per_s")) > 0]
    if not timed:
        raise LmforgeError(f"{run / 'metrics.jsonl'} has no record with a positive tokens_per_s; "
                           "calibrate needs a run that logged its speed")
    used = timed[1:] if len(timed) >= 3 else timed
    speeds = [float(r["tokens_per_s"]) for r in used]
    tps = statistics.median(speeds)
    mfus = [_number(r.get("mfu")) for r in used]
    mfus = [m for m in mfus if m is not None]
    losses = [(_number(r.get("step")), _number(r.get("loss"))) for r in records if _number(r.get("loss")) is not None]
    token_counts = [_number(r.get("tokens")) for r in records if _number(r.get("tokens")) is not None]
    steps = [_number(r.get("step")) for r in records if _number(r.get("step")) is not None]

    out: dict = {"run": str(run), "records": len(records), "timed_records": len(timed),
                 "records_used": len(used), "warmup_dropped": len(timed) - len(used),
                 "steps": max(steps) if steps else None, "tokens_seen": max(token_counts) if token_counts else None,
                 "final_loss": losses[-1][1] if losses else None,
                 "tokens_per_s": tps, "tokens_per_s_mean": statistics.fmean(speeds),
                 "tokens_per_s_min": min(speeds), "tokens_per_s_max": max(speeds),
                 "mfu": statistics.median(mfus) if mfus else None, "usd_per_hour": usd_per_hour,
                 "tokens_per_hour": tps * 3600, "usd_per_1m_tokens": cost.cost_per_1m_tokens(tps, usd_per_hour),
                 "model": None, "config": None, "lineage": None}

    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        try:
            config = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise LmforgeError(f"{cfg_path} is not valid YAML: {e}") from None
        if isinstance(config, dict):
            out["config"] = config
            cfg, origin = model_from_config(config)
            if cfg is not None:
                n = accounting.n_params(cfg)
                flops = tps * 6 * accounting.matmul_params(cfg)
                out["model"] = {"source": origin, "params": n, "model_tflops_achieved": flops / 1e12}
    lineage = run / "final" / "lmforge.json"
    if lineage.is_file():
        try:
            out["lineage"] = json.loads(lineage.read_text())
        except json.JSONDecodeError:
            print(f"warning: {lineage} is not valid JSON; ignored", file=sys.stderr)
    if tokens:
        hours = tokens / tps / 3600
        out["projection"] = {"tokens": tokens, "hours": hours, "usd": hours * usd_per_hour}
    return out


# ---- a compare run: each variant's measured speed and accuracy, priced by cost.usd_per_1k_queries ----------
def read_compare(path: str | Path) -> tuple[Path, dict]:
    """(the results.json file, its contents) of an `lmforge compare` run; `path` is its --out directory or the file."""
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise LmforgeError(f"{f} does not exist; point at the --out directory of `lmforge compare` (it holds results.json)")
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{f} is not valid JSON ({e.msg}); rerun `lmforge compare`") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list) or "paired" not in data:
        raise LmforgeError(f"{f} is not the results.json of `lmforge compare` (no variants / paired tests); "
                           "rerun compare with this version of lmforge")
    return f, data


def measured_variant(row: dict, usd_per_hour: float | None = None, default_usd_per_hour: float = 1.0) -> dict:
    """One compare variant as plan uses it: accuracy, tokens per query, speed, latency and $ per 1,000 queries.

    A local variant costs machine time at `usd_per_hour` (default: the rate compare priced it at) and its median
    tokens/s, the range from its slowest and fastest timing pass; an API variant its per-token price. Both go
    through cost.usd_per_1k_queries, so at compare's rate this is compare's own figure."""
    v, s = row["variant"], row["summary"]
    tin, tout = float(s["prompt_tokens"]), float(s["output_tokens"])
    out = {"name": v["name"], "kind": v.get("kind", "local"), "model": v["model"], "rag": bool(v.get("rag")),
           "shots": v.get("shots", 0), "accuracy": s["accuracy"], "ci95": s["ci95"], "n": s["n"],
           "tokens_in": tin, "tokens_out": tout, "latency_s": s.get("latency_s"), "tokens_per_s": None,
           "tokens_per_s_range": None, "usd_per_hour": None, "usd_per_1m_tokens": None, "usd_per_1k": None,
           "usd_per_1k_range": None, "price_basis": row.get("cost_basis", ""), "prompt": row.get("prompt", {})}
    if out["kind"] == "api":
        price = row.get("price")
        if price and not s.get("usage_missing"):
            p = cost.TokenPrice(price["input_usd_per_1m"], price["output_usd_per_1m"], price.get("basis", ""))
            out["usd_per_1k"] = cost.usd_per_1k_queries(p, tin, tout)
        return out
    t = row.get("timing")
    if not t:
        return out
    rate = default_usd_per_hour if usd_per_hour is None else usd_per_hour
    if rate < 0:
        raise LmforgeError(f"usd_per_hour cannot be negative, got {rate}")
    # priced at tokens per machine-second (CPU time / threads), the figure other jobs on the machine do not move
    key = "machine_tokens_per_s" if "machine_tokens_per_s" in t else "tokens_per_s"
    tps = float(t[key])
    lo, hi = (float(x) for x in t[f"{key}_range"])
    per_1k = [cost.usd_per_1k_queries(cost.throughput_price(x, rate), tin, tout) for x in (tps, hi, lo)]
    out.update(tokens_per_s=tps, tokens_per_s_range=[lo, hi], wall_tokens_per_s=t.get("tokens_per_s"),
               usd_per_hour=rate, usd_per_1m_tokens=cost.cost_per_1m_tokens(tps, rate), usd_per_1k=per_1k[0],
               usd_per_1k_range=per_1k[1:], price_basis=f"self-hosted, ${rate:g}/hour at the measured speed")
    return out


def calibrate_compare(path: str | Path, usd_per_hour: float | None = None) -> dict:
    """Every variant of a compare run, priced (see measured_variant), with the run's timing conditions."""
    f, data = read_compare(path)
    base_rate = float(data.get("usd_per_hour", 1.0))
    return {"run": str(f.parent), "results": str(f), "command": data.get("command"), "task": data.get("task"),
            "n": data.get("n"), "baseline": data.get("baseline"), "timing": data.get("timing", {}),
            "usd_per_hour": base_rate if usd_per_hour is None else usd_per_hour,
            "variants": [measured_variant(r, usd_per_hour, base_rate) for r in data["variants"]],
            "paired": data["paired"]}


def paired_test(paired: list[dict], a: str, b: str) -> dict | None:
    """The paired test of b against a from a compare run's table, oriented as b - a; None if the run has no such pair."""
    for p in paired:
        if (p["a"], p["b"]) == (a, b):
            return p
        if (p["a"], p["b"]) == (b, a):
            lo, hi = p["diff_ci95"]
            out = {**p, "a": a, "b": b, "accuracy_a": p["accuracy_b"], "accuracy_b": p["accuracy_a"],
                   "diff": -p["diff"], "diff_ci95": [-hi, -lo], "only_a": p["only_b"], "only_b": p["only_a"]}
            if p.get("score"):  # a graded metric's paired test, oriented the same way
                t = p["score"]
                out["score"] = {**t, "mean_a": t["mean_b"], "mean_b": t["mean_a"], "diff": -t["diff"],
                                "diff_ci95": [-t["diff_ci95"][1], -t["diff_ci95"][0]]}
            return out
    return None
