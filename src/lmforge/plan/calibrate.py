"""Calibration from a measured run: a run directory's metrics.jsonl -> this machine's tokens/s -> $ per 1M tokens.

Reads runs/NAME/metrics.jsonl (one JSON object per logging step; the records used carry `tokens_per_s`, and
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
                 "tokens_per_hour": tps * 3600, "usd_per_1m_tokens": usd_per_hour / (tps * 3600) * 1e6,
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
