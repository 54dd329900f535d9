"""`lmforge compare`: run several variants on the same held-out items and show what each buys and costs.

    lmforge compare --task heldout.jsonl --variant base=runs/x/final --variant fewshot=runs/x/final,shots=5 \\
        --variant rag=runs/x/final,rag=indexes/docs --variant finetuned=runs/y/final \\
        --variant api=openai:gpt-4o-mini@https://api.openai.com/v1 [--baseline base] [--usd-per-hour 2.5]

A variant is NAME=MODEL (a model directory, a .gguf file or a packaged model name), or NAME=openai:MODEL@BASE_URL for an OpenAI-compatible endpoint (eval/api.py),
followed by comma-separated options: shots=K, rag=INDEX_DIR, top_k=N, chat=auto|on|off (local), and for an
endpoint usd_per_1m_in=X,usd_per_1m_out=Y when the price table does not know the model.
Every variant sees the same items in the same order (the same few-shot draws too). Per variant:
  - accuracy with its Wilson 95% interval, and against the baseline (--baseline, default the first variant) the
    difference with a paired-bootstrap 95% interval and McNemar's exact p-value (eval/stats.py); results.md
    marks the differences significant at 95%. Every pair's test is in results.json (plan reads them);
  - how it was asked: chat template applied or not, shots and retrieved chunks used per item (means: shots are
    dropped when a prompt does not fit), and how it was scored: log-likelihood of each choice (local multiple
    choice), or generation (prompt/answer items, and multiple choice through an API: by the letter it answers);
  - latency and tokens/s (wall clock) and machine seconds per query (CPU time / threads), each the median with
    its range, measured by eval/timing.py's protocol (a fixed thread count, warm-up, interleaved passes over the
    same items), the load average recorded beside them;
  - $ per 1,000 queries through lmforge.plan.cost.usd_per_1k_queries, the one formula plan and its decision
    report use too: a local variant at machine time (its tokens at the median tokens per machine-second, at
    --usd-per-hour; the range from the slowest and fastest pass), an endpoint at its per-token prices from plan's price table
    (plan/prices.yaml, extended by --prices FILE) times the tokens its `usage` reported; "unpriced" when neither
    the table nor the variant gives a price.
So the self-hosted cost is this machine's, at this machine's speed: rerun on the hardware you would serve from,
with its hourly price (and --threads its cores), to get your figure.

Writes into --out (default runs/compare-YYYYmmdd-HHMMSS): results.md (the tables and the command that made them),
results.json (everything, for `lmforge plan compare --measured DIR`), compare.png (accuracy with CI bars, and cost
per 1k queries with the timing spread), predictions-NAME.jsonl (every item's prompt, prediction and score) and
config.yaml (the resolved config).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.config import command_line, opt, save_config
from lmforge.errors import LmforgeError
from lmforge.eval.task import METRICS

PROG = "lmforge compare"
_SHAPE = ("NAME=MODEL_DIR[,shots=K][,rag=INDEX][,top_k=N][,chat=auto|on|off] or "
          "NAME=openai:MODEL@BASE_URL[,shots=K][,rag=INDEX][,usd_per_1m_in=X,usd_per_1m_out=Y]")


@dataclass
class CompareConfig:
    task: str = opt("", help="held-out JSONL examples every variant is scored on")
    variant: list[str] = opt(default_factory=list, help=f"{_SHAPE} (repeat)")
    baseline: str = opt("", help="the variant the others are tested against (default: the first)")
    out: str = opt("", help="output directory (default: runs/compare-<time>)")
    metric: str | None = opt(None, help="exact | contains | choice (default: choice for choice items, else exact)",
                             choices=[*METRICS])
    usd_per_hour: float = opt(1.0, help="what the machine costs per hour, $ (prices the queries at the measured speed)")
    prices: str = opt("", help="YAML file extending plan's price table (API models' $ per 1M tokens)")
    api_key_env: str = opt("OPENAI_API_KEY", help="environment variable holding the API variants' key")
    limit: int = opt(0, help="use only the first N items (0: all)")
    max_new_tokens: int = opt(64, help="most tokens generated per item")
    concurrency: int = opt(1, help="requests in flight at once (1 = latency as one user sees it)")
    length_norm: bool = opt(False, help="choice metric: rank by length-normalised accuracy")
    seed: int = opt(0, help="seed of the few-shot draws and the bootstrap")
    threads: int = opt(1, help="CPU threads for torch, the same for every variant and pass (1: steady figures on "
                               "a shared machine; give your serving machine's core count to price it)")
    timing_items: int = opt(20, help="items each timing pass runs (the first N; 0: all)")
    timing_passes: int = opt(5, help="timed passes per local variant after one warm-up pass (0: no timing)")
    dtype: str = opt("float32", help="weights and activations dtype", choices=["float32", "bfloat16", "float16"])
    device: str = opt("cpu", help="torch device")
    compile: bool = opt(True, help="compile the decode step (a model's first compile takes minutes, cached after; "
                                   "--no-compile)")
    json: bool = opt(False, help="print the summaries as JSON instead of a table")


@dataclass
class Variant:
    name: str
    model: str  # a model directory, or "openai:MODEL@BASE_URL"
    shots: int = 0
    rag: str = ""
    top_k: int = 3
    chat: str = "auto"
    api_model: str = ""  # an endpoint's model name (API variants only)
    base_url: str = ""
    usd_per_1m_in: float | None = None
    usd_per_1m_out: float | None = None

    @property
    def is_api(self) -> bool:
        return bool(self.base_url)


def parse_variant(spec: str) -> Variant:
    """NAME=DIR[,key=value...] or NAME=openai:MODEL@URL[,...] -> Variant, with errors that show the expected shape."""
    head, *opts = spec.split(",")
    name, eq, model = head.partition("=")
    if not eq or not name.strip() or not model.strip():
        raise LmforgeError(f"--variant {spec!r} is not NAME=MODEL_DIR ({_SHAPE})")
    v = Variant(name.strip(), model.strip())
    if v.model.startswith("openai:"):
        api_model, at, url = v.model[len("openai:"):].partition("@")
        if not at or not api_model or not url:
            raise LmforgeError(f"--variant {spec!r}: an endpoint is openai:MODEL@BASE_URL, e.g. "
                               "openai:gpt-4o-mini@https://api.openai.com/v1")
        v.api_model, v.base_url = api_model, url
    allowed = ("shots", "rag", "top_k", "chat") + (("usd_per_1m_in", "usd_per_1m_out") if v.is_api else ())
    for o in opts:
        key, eq, value = o.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in allowed:
            raise LmforgeError(f"--variant {spec!r}: unknown option {o!r}; options are {', '.join(allowed)} ({_SHAPE})")
        if key in ("shots", "top_k"):
            try:
                setattr(v, key, int(value))
            except ValueError:
                raise LmforgeError(f"--variant {spec!r}: {key} must be an integer, got {value!r}") from None
        elif key.startswith("usd_"):
            try:
                setattr(v, key, float(value))
            except ValueError:
                raise LmforgeError(f"--variant {spec!r}: {key} must be a number ($ per 1M tokens), got {value!r}") from None
        elif key == "chat" and value not in ("auto", "on", "off"):
            raise LmforgeError(f"--variant {spec!r}: chat must be auto, on or off")
        elif key == "chat" and v.is_api and value == "off":
            raise LmforgeError(f"--variant {spec!r}: an endpoint is asked through chat completions; chat=off "
                               "has no meaning for it")
        else:
            setattr(v, key, value)
    if (v.usd_per_1m_in is None) != (v.usd_per_1m_out is None):
        raise LmforgeError(f"--variant {spec!r}: give both usd_per_1m_in and usd_per_1m_out")
    return v


# ---- cost: one formula, plan's -------------------------------------------------------------------------
def cost_per_1k(summary: dict, usd_per_hour: float, tokens_per_s: float | None = None) -> float | None:
    """$ for 1,000 queries of this variant's mean size as machine time at usd_per_hour (plan.cost.usd_per_1k_queries),
    at the throughput given, else its measured tokens per machine-second (eval/timing.py), else its tokens/s."""
    from lmforge.plan.cost import throughput_price, usd_per_1k_queries

    tps = tokens_per_s if tokens_per_s is not None else \
        summary.get("machine_tokens_per_s") or summary.get("tokens_per_s")
    if not tps:
        return None
    return usd_per_1k_queries(throughput_price(tps, usd_per_hour), summary["prompt_tokens"], summary["output_tokens"])


_DATED = re.compile(r"^(.*?)-(\d{4}-\d{2}-\d{2}|\d{4})$")  # gpt-4o-mini-2024-07-18 -> gpt-4o-mini


def api_price(v: Variant, table) -> tuple[object | None, str]:
    """(TokenPrice or None, where it comes from) for an endpoint variant."""
    from lmforge.plan.cost import TokenPrice

    if v.usd_per_1m_in is not None:
        return TokenPrice(v.usd_per_1m_in, v.usd_per_1m_out, "the variant's usd_per_1m_in/out"), \
            f"${v.usd_per_1m_in:g} in / ${v.usd_per_1m_out:g} out per 1M tokens (given)"
    name = v.api_model
    m = _DATED.match(name)
    for candidate in (name, m.group(1) if m else None):
        if candidate and table.has_model(candidate):
            p = table.model(candidate)
            basis = f"{p.name} list price ${p.input_usd_per_1m:g} in / ${p.output_usd_per_1m:g} out per 1M tokens" + \
                (f" ({p.date})" if p.date else "")
            return TokenPrice(p.input_usd_per_1m, p.output_usd_per_1m, basis), basis
    return None, (f"unpriced: {name} is not in the price table; add it with --prices FILE.yaml or give "
                  "usd_per_1m_in=X,usd_per_1m_out=Y on the variant")


# ---- outcomes and tests --------------------------------------------------------------------------------
def outcomes(records: list[dict], length_norm: bool) -> list[bool]:
    """Per item, whether the variant's headline answer was right (the figure its accuracy counts)."""
    key = "correct_norm" if length_norm and records and "correct_norm" in records[0] else "correct"
    return [bool(r[key]) for r in records]


def paired_tests(names: list[str], correct: dict[str, list[bool]], seed: int,
                 scores: dict[str, list[float]] | None = None) -> list[dict]:
    """Every pair (a before b in the given order): b against a on the same items (stats.paired_comparison); with
    graded scores (rougel, f1), also their paired permutation test under "score" (stats.paired_score_test)."""
    from lmforge.eval.stats import paired_comparison, paired_score_test

    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            row = {"a": a, "b": b, **paired_comparison(correct[a], correct[b], seed=seed)}
            if scores is not None:
                row["score"] = paired_score_test(scores[a], scores[b], seed=seed)
            out.append(row)
    return out


# ---- the report ---------------------------------------------------------------------------------------
def _sig(x: float, digits: int = 3) -> str:
    """x to `digits` significant digits, without an exponent (dollars and seconds span many decades)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def _range(mid: float | None, rng: list[float] | None, digits: int = 3) -> str:
    """median (low-high), each to `digits` significant digits."""
    if mid is None:
        return "-"
    return _sig(mid, digits) + (f" ({_sig(rng[0], digits)}-{_sig(rng[1], digits)})" if rng else "")


def markdown(cfg: CompareConfig, result: dict) -> str:
    from lmforge.eval.report import table

    rows, base, timing = result["variants"], result["baseline"], result["timing"]
    lines = [f"# Comparison on {result['task']}", "", f"Command: `{result['command']}`", "",
             f"{result['n']} items, metric `{result['metric']}`, the same items in the same order for every "
             f"variant; baseline `{base}`.", "", "## Accuracy", ""]
    body = []
    for r in rows:
        s, p, vs = r["summary"], r["prompt"], r["vs_baseline"]
        lo, hi = s["ci95"]
        chat = p["chat_template"] if isinstance(p["chat_template"], str) else ("yes" if p["chat_template"] else "no")
        if vs is None:
            diff = ci = pv = "-"
        else:
            diff = f"{vs['diff']:+.3f}" + (" *" if vs["significant"] else "")
            ci = f"{vs['diff_ci95'][0]:+.3f} - {vs['diff_ci95'][1]:+.3f}"
            pv = f"{vs['p_value']:.3g}"
        body.append([r["variant"]["name"], r["variant"]["model"], p["scoring"], chat,
                     f"{p['shots_used']:.1f}" if p["shots"] else "0", f"{p['rag_chunks']:.1f}" if p["rag"] else "-",
                     f"{s['accuracy']:.3f}", f"{lo:.3f} - {hi:.3f}", diff, ci, pv])
    lines.append(table(["variant", "model", "scoring", "chat template", "shots", "rag chunks", "accuracy", "95% CI",
                        f"vs {base}", "95% CI of the difference", "p (McNemar)"], body, markdown=True))
    lines += ["", f"\\* the difference from `{base}` is significant at 95%: McNemar's exact test on the items one "
              "variant got right and the other wrong, p < 0.05 (each variant against the baseline on its own; not "
              "corrected for multiple comparisons). The interval of a difference is a paired bootstrap over the "
              "items (10,000 resamples); the accuracy's 95% CI is Wilson's score interval. Shots and rag chunks are "
              "the means used per item (shots are dropped where a prompt does not fit the context)."]
    if rows and "mean_score" in rows[0]["summary"]:
        lines += ["", f"Graded: each item's {result['metric']} score in [0, 1] (accuracy above counts a score of at "
                  f"least 0.5 as correct).", ""]
        body = []
        for r in rows:
            s, vs = r["summary"], r["vs_baseline"]
            lo, hi = s["score_ci95"]
            t = vs.get("score") if vs else None
            body.append([r["variant"]["name"], f"{s['mean_score']:.3f}", f"{lo:.3f} - {hi:.3f}",
                         "-" if t is None else f"{t['diff']:+.3f}" + (" *" if t["significant"] else ""),
                         "-" if t is None else f"{t['diff_ci95'][0]:+.3f} - {t['diff_ci95'][1]:+.3f}",
                         "-" if t is None else f"{t['p_value']:.3g}"])
        lines.append(table(["variant", f"mean {result['metric']}", "95% CI", f"vs {base}", "95% CI of the difference",
                            "p (permutation)"], body, markdown=True))
        lines += ["", "Mean score: its 95% CI is a bootstrap over the items; against the baseline, the mean "
                  "difference with a paired bootstrap interval and a paired sign-flip permutation test (10,000 "
                  "resamples), \\* at p < 0.05."]
    if any(r["variant"]["base_url"] and r["summary"]["metric"] == "choice" for r in rows):
        lines += ["", "Multiple choice through an API is scored by generation: the letter (or choice text) its "
                  "reply names; local variants by the log-likelihood of each choice. The two are not the same "
                  "measurement: a model may rank the right choice first and still answer another letter."]
    lines += ["", "## Speed and cost", ""]
    body = []
    for r in rows:
        s, t = r["summary"], r["timing"]
        cost = "unpriced" if r["usd_per_1k"] is None and r["variant"]["base_url"] else \
            _range(r["usd_per_1k"], r["usd_per_1k_range"])
        body.append([r["variant"]["name"],
                     _range(t["latency_s"], t["latency_s_range"]) if t else _sig(s["latency_s"]) + " (one pass)",
                     _range(t["tokens_per_s"], t["tokens_per_s_range"]) if t else "-",
                     _range(t["machine_s_per_query"], t["machine_s_per_query_range"]) if t else "-",
                     cost, f"{s['prompt_tokens']:.1f}", f"{s['output_tokens']:.1f}", r["cost_basis"]])
    lines.append(table(["variant", "latency (s)", "tokens/s", "machine s / query", "$ / 1k queries", "tokens in",
                        "tokens out", "cost basis"], body, markdown=True))
    la = timing["loadavg_before"], timing["loadavg_after"]
    load = ", ".join(f"{w} {'/'.join(f'{x:g}' for x in v)}" for w, v in zip(("before", "after"), la) if v)
    if timing["passes"]:
        lines += ["", f"Timing: {timing['threads']} torch thread(s) throughout; {timing['warmup']} warm-up pass, then "
                  f"{timing['passes']} timed passes over the first {timing['items']} items, the variants taking "
                  f"turns {'query by query' if timing['chunk'] == 1 else 'pass by pass'} in a rotating order; "
                  "median (range over the passes). Latency (mean request latency, retrieval included) and tokens/s "
                  "(prompt + generated tokens / wall time) are wall-clock: what a user of this machine saw, other "
                  "jobs included. Machine s / query is this process's CPU time / threads: the work a query took, "
                  f"which other jobs do not inflate. Identical models agree within {timing['tolerance']:.0%} in "
                  f"machine time and cost, within {timing['wall_tolerance']:.0%} in wall-clock figures on a busy "
                  "machine (eval/timing.py)." + (f" Load average (1/5/15 min): {load}." if load else "")]
    else:
        lines += ["", "Not timed (--timing-passes 0): latency is the scoring pass's mean; no cost."]
    lines += ["", f"Cost: $ per 1,000 queries of the variant's mean tokens, through lmforge.plan.cost."
              f"usd_per_1k_queries: local variants as machine time at ${cfg.usd_per_hour:g}/hour (the median tokens "
              "per machine-second; range: at the fastest and slowest pass); API variants at their price per 1M "
              "tokens, with the tokens the endpoint reported (API latency: one pass, the remote's).", ""]
    return "\n".join(lines)


def chart(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy with Wilson CI error bars, and $ per 1k queries with the range over the timing passes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"]["name"] for r in rows]
    acc = [r["summary"]["accuracy"] for r in rows]
    lo = [max(0.0, a - r["summary"]["ci95"][0]) for a, r in zip(acc, rows)]  # max: float rounding at 0 or 1
    hi = [max(0.0, r["summary"]["ci95"][1] - a) for a, r in zip(acc, rows)]
    cost = [r["usd_per_1k"] or 0.0 for r in rows]
    clo = [max(0.0, c - (r["usd_per_1k_range"] or [c, c])[0]) for c, r in zip(cost, rows)]
    chi = [max(0.0, (r["usd_per_1k_range"] or [c, c])[1] - c) for c, r in zip(cost, rows)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(7, 1.6 * len(rows) + 4), 4))
    x = range(len(rows))
    ax1.bar(x, acc, yerr=[lo, hi], capsize=6, color="#4C72B0")
    ax1.set_xticks(list(x), names)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("accuracy (95% Wilson CI)")
    for i, a in enumerate(acc):
        ax1.text(i, min(a + hi[i], 1) + 0.02 if a + hi[i] < 0.93 else a / 2, f"{a:.2f}", ha="center")
    ax2.bar(x, cost, yerr=[clo, chi], capsize=6, color="#DD8452")
    ax2.set_xticks(list(x), names)
    ax2.set_ylabel("$ per 1,000 queries (range over timing passes)")
    for i, r in enumerate(rows):
        if r["usd_per_1k"] is None:
            ax2.text(i, 0, "unpriced" if r["variant"]["base_url"] else "not timed", ha="center", va="bottom")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the run ------------------------------------------------------------------------------------------
def _check(cfg: CompareConfig) -> list[Variant]:
    if not cfg.task:
        raise LmforgeError("say which held-out examples to compare on: --task FILE.jsonl")
    if not cfg.variant:
        raise LmforgeError("give at least one variant: --variant NAME=MODEL_DIR[,shots=K][,rag=INDEX] (repeat)")
    if cfg.usd_per_hour < 0:
        raise LmforgeError(f"--usd-per-hour cannot be negative, got {cfg.usd_per_hour}")
    if cfg.threads < 1 or cfg.timing_passes < 0 or cfg.timing_items < 0:
        raise LmforgeError("--threads must be at least 1, --timing-passes and --timing-items at least 0")
    variants = [parse_variant(s) for s in cfg.variant]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise LmforgeError(f"variant names must differ: {', '.join(names)}")
    if cfg.baseline and cfg.baseline not in names:
        raise LmforgeError(f"--baseline {cfg.baseline!r} is not one of the variants ({', '.join(names)})")
    from lmforge.inference.load import check_model

    for v in variants:
        if not v.is_api:
            check_model(v.model, f"variant {v.name}: model")  # a directory, a .gguf file or a packaged name
    return variants


def _api_key(cfg: CompareConfig) -> str | None:
    key = os.environ.get(cfg.api_key_env)
    if key:
        return key
    if cfg.api_key_env != "OPENAI_API_KEY":
        raise LmforgeError(f"--api-key-env {cfg.api_key_env}: that environment variable is not set")
    print("warning: OPENAI_API_KEY is not set; calling the API variants without a key", file=sys.stderr)
    return None


def run(cfg: CompareConfig) -> int:
    import torch

    from lmforge.eval import task as task_mod
    from lmforge.eval import timing as timing_mod
    from lmforge.eval.lm import EvalModel
    from lmforge.eval.report import progress, write_json
    from lmforge.plan.calibrate import paired_test
    from lmforge.plan.cost import usd_per_1k_queries
    from lmforge.plan.prices import load_prices

    variants = _check(cfg)
    baseline = cfg.baseline or variants[0].name
    examples = task_mod.load_examples(cfg.task)  # fail on a bad file before loading any model
    metric = cfg.metric or ("choice" if examples[0].is_choice else "exact")
    n = len(examples) if cfg.limit <= 0 else min(cfg.limit, len(examples))
    table = load_prices(cfg.prices or None) if any(v.is_api for v in variants) else None
    key = _api_key(cfg) if any(v.is_api for v in variants) else None
    command = command_line(cfg, PROG)
    out = Path(cfg.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    torch.set_num_threads(cfg.threads)  # the scoring pass too; timing re-asserts it before every chunk

    models: dict[str, EvalModel] = {}
    indexes: dict[str, object] = {}
    clients = []
    runners: dict[str, object] = {}
    for v in variants:
        if v.rag and v.rag not in indexes:
            from lmforge.rag.index import Index

            indexes[v.rag] = Index.open(v.rag)
            indexes[v.rag].embedder  # noqa: B018  (load now, not inside the first query's latency)
        if v.is_api:
            from lmforge.eval.api import ApiClient, ApiRunner

            client = ApiClient(v.base_url, v.api_model, key)
            clients.append(client)
            runners[v.name] = ApiRunner(client, examples, metric, v.shots, indexes.get(v.rag), v.top_k, cfg.seed,
                                        cfg.max_new_tokens)
            continue
        if v.model not in models:
            print(f"loading {v.model}", file=sys.stderr)
            models[v.model] = EvalModel(v.model, cfg.dtype, cfg.device, compile=cfg.compile)
        em = models[v.model]
        if v.shots < 0 or v.top_k < 1:
            raise LmforgeError(f"variant {v.name}: shots must be >= 0 and top_k >= 1")
        runners[v.name] = task_mod.Runner(em, examples, metric, v.shots, task_mod.resolve_chat(v.chat, em),
                                          indexes.get(v.rag), v.top_k, cfg.seed, cfg.max_new_tokens)

    try:
        # 1. the scoring pass: every item once per variant (deterministic: greedy and log-likelihoods)
        records: dict[str, list[dict]] = {}
        summaries: dict[str, dict] = {}
        for v in variants:
            t0 = time.perf_counter()
            with progress(n, v.name) as advance:
                records[v.name] = runners[v.name].run(cfg.limit, cfg.concurrency, advance)
            recs = records[v.name]
            missing = any(r["prompt_tokens"] is None or r["output_tokens"] is None for r in recs)
            for r in recs:  # an endpoint that reports no usage: counted as 0, and said below
                r["prompt_tokens"], r["output_tokens"] = r["prompt_tokens"] or 0, r["output_tokens"] or 0
            s = task_mod.summarize(recs, time.perf_counter() - t0, cfg.length_norm)
            s.update({"metric": metric, "usage_missing": missing} if v.is_api else {"metric": metric})
            summaries[v.name] = s
            lo, hi = s["ci95"]
            print(f"{v.name}: accuracy {s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]", file=sys.stderr)

        # 2. timing: local variants, by eval/timing.py's protocol
        local = [v.name for v in variants if not v.is_api]
        items = list(range(n if cfg.timing_items <= 0 else min(cfg.timing_items, n)))
        timing: dict = {"threads": cfg.threads, "passes": 0, "warmup": 0, "items": len(items),
                        "chunk": 1 if cfg.concurrency == 1 else len(items), "loadavg_before": timing_mod.loadavg(),
                        "loadavg_after": None, "tolerance": timing_mod.CPU_TOLERANCE,
                        "wall_tolerance": timing_mod.WALL_TOLERANCE, "variants": {}}
        if local and cfg.timing_passes > 0:
            print(f"timing {len(local)} variant(s): {cfg.timing_passes} passes over {len(items)} items, "
                  f"{cfg.threads} thread(s)", file=sys.stderr)
            runs = {name: (lambda ix, r=runners[name]: r.run(concurrency=cfg.concurrency, items=ix)) for name in local}
            timing = timing_mod.measure(runs, items, cfg.timing_passes, cfg.threads, chunk=timing["chunk"])
    finally:
        for c in clients:
            c.close()

    # 3. paired tests, cost, rows
    names = [v.name for v in variants]
    graded = all(recs and "score" in recs[0] for recs in records.values())
    pairs = paired_tests(names, {k: outcomes(records[k], cfg.length_norm) for k in names}, cfg.seed,
                         {k: [r["score"] for r in records[k]] for k in names} if graded else None)
    rows = []
    for v in variants:
        s, recs, t = summaries[v.name], records[v.name], timing["variants"].get(v.name)
        if t is not None:  # the table's speed figures are the protocol's, not the scoring pass's
            s.update({k: t[k] for k in ("latency_s", "tokens_per_s", "machine_tokens_per_s", "machine_s_per_query")})
        if v.is_api:
            price, basis = api_price(v, table)
            usd = None if price is None or s.get("usage_missing") else \
                usd_per_1k_queries(price, s["prompt_tokens"], s["output_tokens"])
            if price is not None and s.get("usage_missing"):
                basis = "the endpoint reported no token usage, so no cost"
            usd_range = None
            price_json = None if price is None else asdict(price)
        else:
            usd = cost_per_1k(s, cfg.usd_per_hour) if t else None
            usd_range = None if t is None else sorted(cost_per_1k(s, cfg.usd_per_hour, x)
                                                     for x in t["machine_tokens_per_s_range"])
            basis = f"self-hosted, ${cfg.usd_per_hour:g}/hour, {cfg.threads} thread(s)" if t else "not timed"
            price_json = None
        chat = "endpoint's" if v.is_api else runners[v.name].chat
        scoring = ("generation (answer letter)" if v.is_api else
                   "log-likelihood" + (" (length-normalised)" if cfg.length_norm else "")) if metric == "choice" \
            else f"generation ({metric})"
        prompt = {"chat_template": chat, "shots": v.shots, "shots_used": sum(r["shots"] for r in recs) / max(1, len(recs)),
                  "rag": v.rag or None, "rag_chunks": sum(len(r["sources"]) for r in recs) / max(1, len(recs)),
                  "scoring": scoring}
        rows.append({"variant": {**asdict(v), "kind": "api" if v.is_api else "local"}, "summary": s, "prompt": prompt,
                     "timing": t, "usd_per_1k": usd, "usd_per_1k_range": usd_range, "cost_basis": basis,
                     "price": price_json, "vs_baseline": None if v.name == baseline else paired_test(pairs, baseline, v.name)})
        with open(out / f"predictions-{v.name}.jsonl", "w", encoding="utf-8") as f:
            for rec in recs:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    result = {"command": command, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "task": cfg.task, "n": n,
              "metric": metric, "baseline": baseline, "usd_per_hour": cfg.usd_per_hour,
              "timing": {k: v for k, v in timing.items() if k != "variants"}, "paired": pairs, "variants": rows}
    md = markdown(cfg, result)
    (out / "results.md").write_text(md)
    write_json(result, out / "results.json")
    chart(rows, out / "compare.png", f"{Path(cfg.task).name}: {n} items, metric {metric}")
    if cfg.json:
        print(json.dumps(rows, indent=1))
    else:
        print(md)
    print(f"wrote {out}/results.md, results.json, compare.png, predictions-*.jsonl", file=sys.stderr)
    return 0
