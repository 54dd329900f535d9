"""`lmforge compare`: run several variants on the same held-out examples and show what each buys and costs.

    lmforge compare --task heldout.jsonl --variant base=runs/x/final --variant fewshot=runs/x/final,shots=5 \
        --variant rag=runs/x/final,rag=indexes/docs --variant finetuned=runs/y/final [--out DIR] [--usd-per-hour 2.5]

A variant is NAME=MODEL_DIR followed by comma-separated options: shots=K, rag=INDEX_DIR, top_k=N, chat=auto|on|off.
Every variant sees the same items in the same order (same few-shot draws too). Per variant: accuracy with its
Wilson 95% interval, mean latency per query (retrieval included; one request at a time unless --concurrency),
prompt and generated tokens per query, and the self-hosted cost of 1,000 queries: each query occupies the machine
for (its tokens / the tokens per second measured here for that variant), priced at --usd-per-hour through
lmforge.plan.cost.self_hosted_cost_per_query. So the cost is this machine's, at this machine's speed: rerun on
the hardware you would serve from, with its hourly price, to get your figure.

Writes into --out (default runs/compare-YYYYmmdd-HHMMSS): results.md (the table), results.json (summaries),
compare.png (accuracy with CI bars, and cost per 1k queries), predictions-NAME.jsonl (every item's prompt,
prediction and score) and config.yaml (the resolved config).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import opt, save_config
from lmforge.errors import LmforgeError
from lmforge.eval.task import METRICS, TaskConfig


@dataclass
class CompareConfig:
    task: str = opt("", help="held-out JSONL examples every variant is scored on")
    variant: list[str] = opt(default_factory=list, help="NAME=MODEL_DIR[,shots=K][,rag=INDEX][,top_k=N][,chat=auto|on|off] (repeat)")
    out: str = opt("", help="output directory (default: runs/compare-<time>)")
    metric: str | None = opt(None, help="exact | contains | choice (default: choice for choice items, else exact)",
                             choices=[*METRICS])
    usd_per_hour: float = opt(1.0, help="what the machine costs per hour, $ (prices the queries at the measured speed)")
    limit: int = opt(0, help="use only the first N items (0: all)")
    max_new_tokens: int = opt(64, help="most tokens generated per item")
    concurrency: int = opt(1, help="requests in flight at once (1 = latency as one user sees it)")
    length_norm: bool = opt(False, help="choice metric: rank by length-normalised accuracy")
    seed: int = opt(0, help="seed of the few-shot draws")
    dtype: str = opt("float32", help="weights and activations dtype", choices=["float32", "bfloat16", "float16"])
    device: str = opt("cpu", help="torch device")
    json: bool = opt(False, help="print the summaries as JSON instead of a table")


@dataclass
class Variant:
    name: str
    model: str
    shots: int = 0
    rag: str = ""
    top_k: int = 3
    chat: str = "auto"


def parse_variant(spec: str) -> Variant:
    """NAME=DIR[,key=value...] -> Variant, with errors that show the expected shape."""
    shape = "NAME=MODEL_DIR[,shots=K][,rag=INDEX][,top_k=N][,chat=auto|on|off]"
    head, *opts = spec.split(",")
    name, eq, model = head.partition("=")
    if not eq or not name.strip() or not model.strip():
        raise LmforgeError(f"--variant {spec!r} is not {shape}")
    v = Variant(name.strip(), model.strip())
    for o in opts:
        key, eq, value = o.partition("=")
        key = key.strip()
        if not eq or key not in ("shots", "rag", "top_k", "chat"):
            raise LmforgeError(f"--variant {spec!r}: unknown option {o!r}; options are shots, rag, top_k, chat ({shape})")
        if key in ("shots", "top_k"):
            try:
                setattr(v, key, int(value))
            except ValueError:
                raise LmforgeError(f"--variant {spec!r}: {key} must be an integer, got {value!r}") from None
        elif key == "chat" and value not in ("auto", "on", "off"):
            raise LmforgeError(f"--variant {spec!r}: chat must be auto, on or off")
        else:
            setattr(v, key, value.strip())
    return v


def cost_per_1k(summary: dict, usd_per_hour: float) -> float | None:
    """$ for 1,000 queries of this variant's mean size at its measured tokens/s (plan's self-hosted formula)."""
    from lmforge.plan.cost import self_hosted_cost_per_query

    tps = summary.get("tokens_per_s")
    if not tps:
        return None
    tokens = summary["prompt_tokens"] + summary["output_tokens"]
    return 1000 * self_hosted_cost_per_query(tps, usd_per_hour, tokens)


def markdown(cfg: CompareConfig, rows: list[dict]) -> str:
    from lmforge.eval.report import table

    first = rows[0]["summary"]
    lines = [f"# Comparison on {cfg.task}", "",
             f"{first['n']} items, metric `{first['metric']}`; the same items for every variant.", ""]
    headers = ["variant", "model", "shots", "rag", "accuracy", "95% CI", "latency (s)", "tokens in", "tokens out",
               "$ / 1k queries"]
    body = []
    for r in rows:
        s, v = r["summary"], r["variant"]
        lo, hi = s["ci95"]
        body.append([v["name"], v["model"], str(v["shots"]), v["rag"] or "-", f"{s['accuracy']:.3f}",
                     f"{lo:.3f} - {hi:.3f}", f"{s['latency_s']:.4f}", f"{s['prompt_tokens']:.1f}",
                     f"{s['output_tokens']:.1f}", "-" if r["usd_per_1k"] is None else f"{r['usd_per_1k']:.4f}"])
    lines.append(table(headers, body, markdown=True))
    lines += ["", f"Cost: self-hosted at ${cfg.usd_per_hour:g}/hour at the tokens/s measured in this run "
              f"(concurrency {cfg.concurrency}); latency includes retrieval for RAG variants. "
              "95% CI: Wilson score interval.", ""]
    return "\n".join(lines)


def chart(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy with Wilson CI error bars, and $ per 1k queries, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"]["name"] for r in rows]
    acc = [r["summary"]["accuracy"] for r in rows]
    lo = [a - r["summary"]["ci95"][0] for a, r in zip(acc, rows)]
    hi = [r["summary"]["ci95"][1] - a for a, r in zip(acc, rows)]
    cost = [r["usd_per_1k"] or 0.0 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(7, 1.6 * len(rows) + 4), 4))
    x = range(len(rows))
    ax1.bar(x, acc, yerr=[lo, hi], capsize=6, color="#4C72B0")
    ax1.set_xticks(list(x), names)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("accuracy (95% Wilson CI)")
    for i, a in enumerate(acc):
        ax1.text(i, min(a + hi[i], 1) + 0.02 if a + hi[i] < 0.93 else a / 2, f"{a:.2f}", ha="center")
    ax2.bar(x, cost, color="#DD8452")
    ax2.set_xticks(list(x), names)
    ax2.set_ylabel("$ per 1,000 queries")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: CompareConfig) -> int:
    from lmforge.eval import task as task_mod
    from lmforge.eval.lm import EvalModel
    from lmforge.eval.report import write_json
    from lmforge.inference.load import check_model

    if not cfg.task:
        raise LmforgeError("say which held-out examples to compare on: --task FILE.jsonl")
    if not cfg.variant:
        raise LmforgeError("give at least one variant: --variant NAME=MODEL_DIR[,shots=K][,rag=INDEX] (repeat)")
    if cfg.usd_per_hour < 0:
        raise LmforgeError(f"--usd-per-hour cannot be negative, got {cfg.usd_per_hour}")
    variants = [parse_variant(s) for s in cfg.variant]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise LmforgeError(f"variant names must differ: {', '.join(names)}")
    for v in variants:
        check_model(v.model, f"variant {v.name}: model")
    task_mod.load_examples(cfg.task)  # fail on a bad file before loading any model
    out = Path(cfg.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    models: dict[str, EvalModel] = {}
    indexes: dict[str, object] = {}
    rows = []
    for v in variants:
        if v.model not in models:
            print(f"loading {v.model}", file=sys.stderr)
            models[v.model] = EvalModel(v.model, cfg.dtype, cfg.device)
            em = models[v.model]
            em.generate([em.encode_prompt("warm up")], 2)  # first-call costs stay out of the timings
        if v.rag and v.rag not in indexes:
            from lmforge.rag.index import Index

            indexes[v.rag] = Index.open(v.rag)
            indexes[v.rag].embedder  # noqa: B018  (load now, not inside the first query's latency)
        tcfg = TaskConfig(model=v.model, data=cfg.task, metric=cfg.metric, shots=v.shots, rag=v.rag, top_k=v.top_k,
                          chat=v.chat, length_norm=cfg.length_norm, limit=cfg.limit, max_new_tokens=cfg.max_new_tokens,
                          concurrency=cfg.concurrency, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)
        result = task_mod.evaluate(tcfg, em=models[v.model], index=indexes.get(v.rag), label=v.name)
        s = result["summary"]
        rows.append({"variant": v.__dict__, "summary": s, "usd_per_1k": cost_per_1k(s, cfg.usd_per_hour)})
        with open(out / f"predictions-{v.name}.jsonl", "w", encoding="utf-8") as f:
            for rec in result["records"]:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        lo, hi = s["ci95"]
        print(f"{v.name}: accuracy {s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}], {s['latency_s']:.3f}s/query",
              file=sys.stderr)

    md = markdown(cfg, rows)
    (out / "results.md").write_text(md)
    write_json({"task": cfg.task, "usd_per_hour": cfg.usd_per_hour, "variants": rows}, out / "results.json")
    chart(rows, out / "compare.png", f"{Path(cfg.task).name}: {rows[0]['summary']['n']} items, "
                                     f"metric {rows[0]['summary']['metric']}")
    if cfg.json:
        print(json.dumps(rows, indent=1))
    else:
        print(md)
    print(f"wrote {out}/results.md, results.json, compare.png, predictions-*.jsonl", file=sys.stderr)
    return 0

