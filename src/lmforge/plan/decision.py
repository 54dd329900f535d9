"""Which option solves the problem: a scenario's options priced side by side, break-even volumes, a recommendation.

A scenario (YAML; configs/scenario-example.yaml) states the workload (queries a month, tokens per query, the
horizon over which one-off costs are spread), the needs, and the options. Each option becomes a cost.CostLine:
  api           an API model from the price table; `rag:` adds retrieved context tokens and its own costs
  self_hosted   a preset or --params model on a GPU (inference.self_hosted_query); `finetune:` and `pretrain:`
                add their training bills (training.py) as one-off costs
  custom        figures you already know: per_query, one_off, per_month, latency_s
  measured      a variant of an `lmforge compare` run (results: its --out, variant: its name): the per-query cost
                compare measured (calibrate.measured_variant: machine time at its tokens/s, or an API's price,
                through cost.usd_per_1k_queries), its latency, and its accuracy on the compare's items
Options without a measurement are assumed good enough at the task (list only those you would accept). Measured
options are compared on accuracy only where the evidence holds: an option is ranked down (a major gap) when it is
significantly less accurate than the most accurate measured option, by McNemar's exact test on the same items at
95% (compare's paired table). A difference that is not significant ranks nobody down, so a winner is never chosen,
nor described, for an accuracy advantage that could be chance; options measured on different items are not
compared on accuracy at all. The recommendation is a rule list a reviewer can read: options that break a hard need (budget,
latency, data that must stay local, too few examples to finetune on, a model that does not fit its GPU) are out;
the rest rank by how many major needs they miss (your documents without retrieval, open-ended requests on a
narrow finetuned model, training from scratch although a base model exists, finetuning data of unknown size),
then by monthly cost at the volume, where each minor miss (a fixed format or tone carried by the prompt alone)
counts as MINOR_GAP_PREMIUM more cost: a finetune that holds the format is worth paying somewhat more for, not 10x.
The reasons name the figures behind each step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import load_yaml
from lmforge.errors import LmforgeError
from lmforge.plan import calibrate, cost, inference, report, shape, training
from lmforge.plan.prices import PriceTable

MIN_FINETUNE_EXAMPLES = 100  # below this, few-shot prompting beats a finetune
GOOD_FINETUNE_EXAMPLES = 1000  # LoRA on a narrow task usually works well from here (hundreds to a few thousand)
DEFAULT_RAG_CONTEXT_TOKENS = 1000
MINOR_GAP_PREMIUM = 0.5  # each minor miss weighs as 50% more monthly cost when ranking


@dataclass
class Needs:
    variety: str = "broad"  # narrow: one well-defined task; broad: open-ended requests; "": not known
    consistent_format: bool = False  # outputs must follow a fixed format or house tone
    private_knowledge: bool = False  # answers depend on your own documents, which change
    examples_available: int | None = None  # input -> output examples you could finetune on
    budget_usd_per_month: float | None = None
    max_latency_s: float | None = None
    data_must_stay_local: bool = False  # no third-party API may see the data
    no_suitable_base_model: bool = False  # no open model covers your language or domain


@dataclass
class Scenario:
    name: str = "scenario"
    months: float = 12.0
    queries_per_month: float = 10000.0
    input_tokens: float = 500.0
    output_tokens: float = 200.0
    needs: Needs = field(default_factory=Needs)
    options: list[dict] = field(default_factory=list)


@dataclass
class Option:
    name: str
    kind: str
    line: cost.CostLine
    finetuned: bool = False
    rag: bool = False
    from_scratch: bool = False
    local: bool = False
    latency_s: float | None = None
    details: dict = field(default_factory=dict)
    measured: dict | None = None  # a compare variant: accuracy, ci95, n, and the run's paired tests (`results`)


# ---------------------------------------------------------------- reading a scenario


def _take(raw: dict, key: str, kind: type | tuple, where: str, default: Any = None, required: bool = False) -> Any:
    if key not in raw:
        if required:
            raise LmforgeError(f"{where}: '{key}' is required")
        return default
    value = raw[key]
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise LmforgeError(f"{where}: '{key}' must be a {name}, got {value!r}")
    return value


def _strict(raw: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(raw, dict):
        raise LmforgeError(f"{where} must be a mapping")
    unknown = set(raw) - allowed
    if unknown:
        raise LmforgeError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return raw


def load_scenario(path: str | Path) -> Scenario:
    data = _strict(load_yaml(path), {f.name for f in dataclasses.fields(Scenario)}, f"scenario {path}")
    where = f"scenario {path}"
    needs_raw = _strict(data.get("needs") or {}, {f.name for f in dataclasses.fields(Needs)}, f"{where}: needs")
    nw = f"{where}: needs"
    needs = Needs(
        variety=_take(needs_raw, "variety", str, nw, "broad"),
        consistent_format=_take(needs_raw, "consistent_format", bool, nw, False),
        private_knowledge=_take(needs_raw, "private_knowledge", bool, nw, False),
        examples_available=_take(needs_raw, "examples_available", int, nw, None),
        budget_usd_per_month=_take(needs_raw, "budget_usd_per_month", float, nw, None),
        max_latency_s=_take(needs_raw, "max_latency_s", float, nw, None),
        data_must_stay_local=_take(needs_raw, "data_must_stay_local", bool, nw, False),
        no_suitable_base_model=_take(needs_raw, "no_suitable_base_model", bool, nw, False))
    if needs.variety not in ("narrow", "broad"):
        raise LmforgeError(f"{nw}: variety must be 'narrow' (one task) or 'broad' (open-ended), got {needs.variety!r}")
    options = data.get("options") or []
    if not isinstance(options, list) or len(options) < 1:
        raise LmforgeError(f"{where}: 'options' must be a list of at least one option (kind: api | self_hosted | custom)")
    sc = Scenario(name=str(data.get("name", Path(path).stem)), months=_take(data, "months", float, where, 12.0),
                  queries_per_month=_take(data, "queries_per_month", float, where, 10000.0),
                  input_tokens=_take(data, "input_tokens", float, where, 500.0),
                  output_tokens=_take(data, "output_tokens", float, where, 200.0), needs=needs, options=options)
    if sc.months <= 0 or sc.queries_per_month < 0:
        raise LmforgeError(f"{where}: months must be positive and queries_per_month non-negative")
    return sc


_COMMON = {"name", "kind", "rag", "one_off", "per_month", "latency_s", "tokens_per_s", "first_token_s", "finetuned"}
_KINDS = {
    "api": _COMMON | {"model"},
    "self_hosted": _COMMON | {"model", "params", "gpu", "weight_bits", "batch", "usd_per_hour", "always_on",
                              "bandwidth_efficiency", "mfu", "finetune", "pretrain"},
    "custom": _COMMON | {"per_query", "local", "from_scratch"},
    "measured": _COMMON | {"results", "variant", "usd_per_hour", "always_on", "from_scratch"},
}
_FINETUNE = {"method", "examples", "tokens_per_example", "epochs", "gpu", "gpus", "mfu", "usd_per_hour"}
_PRETRAIN = {"tokens", "gpu", "gpus", "mfu", "usd_per_hour", "seq_len"}
_RAG = {"context_tokens", "one_off", "per_month"}


def build_option(raw: dict, sc: Scenario, prices: PriceTable, index: int = 0) -> Option:
    """Price one scenario option as a CostLine, with its features and the figures behind it."""
    if not isinstance(raw, dict):
        raise LmforgeError(f"scenario option {index + 1} must be a mapping with name: and kind:")
    kind = raw.get("kind")
    if kind not in _KINDS:
        raise LmforgeError(f"scenario option {index + 1} ({raw.get('name', '?')}): kind must be one of "
                           f"{', '.join(_KINDS)}, got {kind!r}")
    name = str(raw.get("name") or f"option {index + 1}")
    where = f"scenario option '{name}'"
    _strict(raw, _KINDS[kind], where)
    one_off = _take(raw, "one_off", float, where, 0.0)
    per_month = _take(raw, "per_month", float, where, 0.0)
    details: dict[str, Any] = {}

    rag_raw = raw.get("rag", False)
    rag = bool(rag_raw)
    rag_ctx = 0.0
    if isinstance(rag_raw, dict):
        _strict(rag_raw, _RAG, f"{where}: rag")
        rag_ctx = _take(rag_raw, "context_tokens", float, f"{where}: rag", DEFAULT_RAG_CONTEXT_TOKENS)
        one_off += _take(rag_raw, "one_off", float, f"{where}: rag", 0.0)
        per_month += _take(rag_raw, "per_month", float, f"{where}: rag", 0.0)
    elif rag_raw is True and kind != "custom":
        rag_ctx = DEFAULT_RAG_CONTEXT_TOKENS
    elif not isinstance(rag_raw, bool):
        raise LmforgeError(f"{where}: rag must be true/false or a mapping with {sorted(_RAG)}")
    if rag_ctx:
        details["rag_context_tokens"] = rag_ctx
    input_tokens = sc.input_tokens + rag_ctx
    tps = _take(raw, "tokens_per_s", float, where, None)
    first = _take(raw, "first_token_s", float, where, 0.5)
    finetuned = _take(raw, "finetuned", bool, where, False)
    latency = _take(raw, "latency_s", float, where, None)
    opt = Option(name=name, kind=kind, line=cost.CostLine(name), rag=rag, finetuned=finetuned)

    if kind == "api":
        model = prices.model(_take(raw, "model", str, where, required=True))
        q = inference.api_query(model, input_tokens, sc.output_tokens, sc.queries_per_month, tps, first)
        details["inference"] = q
        opt.line.per_query = q["usd_per_query"]
        opt.latency_s = q["latency_s"]
    elif kind == "self_hosted":
        model_name = _take(raw, "model", str, where, None)
        sh = shape.resolve(model_name, _take(raw, "params", float, where, None))
        gpu = prices.gpu(_take(raw, "gpu", str, where, required=True))
        always_on = _take(raw, "always_on", bool, where, True)
        q = inference.self_hosted_query(
            sh, gpu, input_tokens, sc.output_tokens, sc.queries_per_month,
            batch=_take(raw, "batch", int, where, 1), weight_bits=_take(raw, "weight_bits", int, where, 16),
            tokens_per_s=tps, usd_per_hour=_take(raw, "usd_per_hour", float, where, None),
            bandwidth_efficiency=_take(raw, "bandwidth_efficiency", float, where, 0.6),
            mfu=_take(raw, "mfu", float, where, 0.4), always_on=always_on)
        details["inference"] = q
        if not q["fits"]:
            details.setdefault("warnings", []).append(
                f"weights + KV cache ({report.gb(q['memory_bytes'])}) do not fit one {gpu.key} "
                f"({report.gb(gpu.memory_bytes)}); lower weight_bits or batch, or pick a bigger GPU")
        if always_on:
            opt.line.unit_per_month = cost.HOURS_PER_MONTH * q["usd_per_gpu_hour"]
            opt.line.capacity_per_unit = q["queries_per_gpu_month"]
        else:
            opt.line.per_query = q["usd_per_query"]
        opt.latency_s = q["latency_s"]
        opt.local = True
        if "finetune" in raw:
            ft = _finetune_bill(raw["finetune"], sh, sc, prices, where)
            details["finetune"] = ft
            one_off += ft["usd"]
            opt.finetuned = True
        if "pretrain" in raw:
            pt = _pretrain_bill(raw["pretrain"], sh, prices, where)
            details["pretrain"] = pt
            one_off += pt["usd"]
            opt.from_scratch = True
    elif kind == "measured":
        _measured(raw, opt, where)
    else:
        opt.line.per_query = _take(raw, "per_query", float, where, 0.0)
        opt.local = _take(raw, "local", bool, where, False)
        opt.from_scratch = _take(raw, "from_scratch", bool, where, False)
    if latency is not None:
        opt.latency_s = latency
    opt.line.one_off, opt.line.per_month = one_off, per_month
    opt.details = {**details, **opt.details}
    return opt


def _measured(raw: dict, opt: Option, where: str) -> None:
    """Fill a `kind: measured` option from its compare run."""
    results = _take(raw, "results", str, where, required=True)
    name = _take(raw, "variant", str, where, opt.name)
    data = calibrate.calibrate_compare(results, _take(raw, "usd_per_hour", float, where, None))
    found = {v["name"]: v for v in data["variants"]}
    if name not in found:
        raise LmforgeError(f"{where}: {data['results']} has no variant {name!r} (it has {', '.join(found)}); "
                           "set variant: NAME")
    m = found[name]
    if m["usd_per_1k"] is None:
        raise LmforgeError(f"{where}: variant {name} of {data['results']} has no cost ({m['price_basis'] or 'not timed'}); "
                           "rerun compare with timing, or give the API's price")
    opt.line.per_query = m["usd_per_1k"] / 1000
    if m["kind"] == "local" and _take(raw, "always_on", bool, where, False):
        # whole machines at usd_per_hour; one serves as many queries a month as its measured speed allows
        seconds = (m["tokens_in"] + m["tokens_out"]) / m["tokens_per_s"]
        opt.line.per_query = 0.0
        opt.line.unit_per_month = cost.HOURS_PER_MONTH * m["usd_per_hour"]
        opt.line.capacity_per_unit = cost.HOURS_PER_MONTH * 3600 / seconds
    opt.latency_s = m["latency_s"]
    opt.local = m["kind"] == "local"
    opt.rag = opt.rag or m["rag"]
    opt.from_scratch = _take(raw, "from_scratch", bool, where, False)
    opt.measured = {"results": data["results"], "variant": name, "accuracy": m["accuracy"], "ci95": m["ci95"],
                    "n": m["n"], "paired": data["paired"]}
    opt.details = {"measured": {k: v for k, v in m.items() if k != "prompt"}, "compare_command": data["command"]}


def measured_options(results: str | Path, usd_per_hour: float | None = None) -> list[dict]:
    """Scenario options (kind: measured) for every variant of a compare run: `plan compare --measured DIR`."""
    data = calibrate.calibrate_compare(results, usd_per_hour)
    out = []
    for v in data["variants"]:
        raw = {"name": v["name"], "kind": "measured", "results": str(results), "variant": v["name"]}
        if usd_per_hour is not None:
            raw["usd_per_hour"] = usd_per_hour
        out.append(raw)
    return out


def accuracy_test(a: Option, b: Option) -> dict | None:
    """The paired test of b against a (b - a), when both were measured on the same items (one compare run)."""
    if not a.measured or not b.measured or a.measured["results"] != b.measured["results"]:
        return None
    return calibrate.paired_test(a.measured["paired"], a.measured["variant"], b.measured["variant"])


def _finetune_bill(raw: Any, sh: shape.Shape, sc: Scenario, prices: PriceTable, where: str) -> dict:
    w = f"{where}: finetune"
    raw = _strict(raw or {}, _FINETUNE, w)
    examples = _take(raw, "examples", int, w, sc.needs.examples_available)
    if not examples:
        raise LmforgeError(f"{w}: say how many examples (finetune.examples or needs.examples_available)")
    tpe = _take(raw, "tokens_per_example", float, w, sc.input_tokens + sc.output_tokens)
    epochs = _take(raw, "epochs", float, w, 3.0)
    method = _take(raw, "method", str, w, "lora")
    gpu = prices.gpu(_take(raw, "gpu", str, w, "a100-80gb"))
    tokens = examples * tpe * epochs
    fl = training.training_flops(sh, tokens, int(tpe), method)
    t = training.compute_time(fl["total"], gpu, _take(raw, "gpus", int, w, 1), _take(raw, "mfu", float, w, 0.3),
                              _take(raw, "usd_per_hour", float, w, None))
    return {"method": method, "examples": examples, "tokens": tokens, "gpu": gpu.key, "flops": fl["total"], **t}


def _pretrain_bill(raw: Any, sh: shape.Shape, prices: PriceTable, where: str) -> dict:
    w = f"{where}: pretrain"
    raw = _strict(raw or {}, _PRETRAIN, w)
    tokens = _take(raw, "tokens", float, w, training.chinchilla_tokens(sh.params))
    gpu = prices.gpu(_take(raw, "gpu", str, w, "h100"))
    fl = training.training_flops(sh, tokens, _take(raw, "seq_len", int, w, 4096), "full")
    t = training.compute_time(fl["total"], gpu, _take(raw, "gpus", int, w, 8), _take(raw, "mfu", float, w, 0.4),
                              _take(raw, "usd_per_hour", float, w, None))
    return {"tokens": tokens, "gpu": gpu.key, "flops": fl["total"], **t}


# ---------------------------------------------------------------- comparing and recommending


def pairwise_breakeven(options: list[Option], months: float) -> list[dict]:
    """For every pair: the monthly volumes where the cheaper of the two changes, and which wins above each."""
    rows = []
    for i, a in enumerate(options):
        for b in options[i + 1:]:
            points = cost.crossovers(a.line, b.line, months)
            above = []
            for q in points:
                qa, qb = a.line.monthly(q * 1.001, months), b.line.monthly(q * 1.001, months)
                above.append(a.name if qa < qb else b.name)
            rows.append({"a": a.name, "b": b.name, "queries_per_month": points, "cheaper_above": above})
    return rows


def _assess(opt: Option, sc: Scenario) -> tuple[list[str], list[str], list[str]]:
    """(blockers, major gaps, minor gaps) of one option against the needs."""
    n = sc.needs
    blockers, gaps, minor = [], [], []
    monthly = opt.line.monthly(sc.queries_per_month, sc.months)
    if n.budget_usd_per_month is not None and monthly > n.budget_usd_per_month:
        blockers.append(f"costs {report.usd(monthly)}/month at {report.count(sc.queries_per_month)} queries, over the "
                        f"{report.usd(n.budget_usd_per_month)} budget")
    if n.max_latency_s is not None and opt.latency_s is not None and opt.latency_s > n.max_latency_s:
        blockers.append(f"latency ~{report.seconds(opt.latency_s)} exceeds the {report.seconds(n.max_latency_s)} limit")
    if n.data_must_stay_local and not opt.local:
        blockers.append("sends your data to a third-party API, and it must stay local")
    if opt.finetuned and n.examples_available is not None and n.examples_available < MIN_FINETUNE_EXAMPLES:
        blockers.append(f"needs a finetune, and {n.examples_available} examples are too few "
                        f"(below {MIN_FINETUNE_EXAMPLES}, few-shot prompting does better)")
    for w in opt.details.get("warnings", []):
        blockers.append(w)
    if n.private_knowledge and not opt.rag:
        gaps.append("answers need your documents, and without retrieval (RAG) it cannot cite them or keep up "
                    "when they change (finetuning does not reliably add facts)")
    if n.consistent_format and not opt.finetuned:
        minor.append("a fixed format or tone rests on the prompt alone; a finetune on examples holds it more reliably")
    if n.variety == "broad" and opt.finetuned and opt.local and opt.kind in ("self_hosted", "measured"):
        gaps.append("requests are open-ended, and a small model finetuned on one task handles little else")
    if opt.from_scratch and not n.no_suitable_base_model:
        gaps.append("trains from scratch although an open base model exists; finetuning one costs a fraction")
    if opt.finetuned and n.examples_available is None:
        gaps.append("needs finetuning data, and the scenario does not say how many examples exist")
    return blockers, gaps, minor


def _accuracy_gaps(assessed: list[dict]) -> Option | None:
    """Rank down (a major gap) each measured option significantly less accurate than the most accurate one.
    Returns that most accurate option (among those no hard need rules out, if any), or None."""
    measured = [a for a in assessed if a["option"].measured]
    if len(measured) < 2:
        return None
    pool = [a for a in measured if not a["blockers"]] or measured
    top = max(pool, key=lambda a: a["option"].measured["accuracy"])["option"]
    for a in measured:
        o = a["option"]
        t = accuracy_test(top, o)
        if o is top or t is None or not t["significant"] or t["diff"] >= 0:
            continue
        a["gaps"].append(f"significantly less accurate than {top.name}: {t['accuracy_b']:.3f} vs "
                         f"{t['accuracy_a']:.3f} on the same {t['n']} items (McNemar p={t['p_value']:.2g})")
    return top


def _accuracy_reasons(win: Option, others: list[Option], top: Option | None) -> list[str]:
    """What the measured accuracies say about the winner, claiming no difference the paired test does not show."""
    if not win.measured:
        return []
    acc = win.measured["accuracy"]
    tested = [(o, accuracy_test(win, o)) for o in others if o.measured]
    unpaired = [o.name for o, t in tested if t is None]
    tested = [(o, t) for o, t in tested if t is not None]
    if not tested:
        return [f"accuracy: {acc:.3f} on {win.measured['n']} items"
                + (f"; {', '.join(unpaired)} measured on other items, so not compared" if unpaired else "")]
    beats = [f"{o.name} ({t['accuracy_b']:.3f}, p={t['p_value']:.2g})" for o, t in tested if t["significant"] and t["diff"] < 0]
    beaten_by = [f"{o.name} ({t['accuracy_b']:.3f}, p={t['p_value']:.2g})" for o, t in tested if t["significant"] and t["diff"] > 0]
    tied = [f"{o.name} ({t['accuracy_b']:.3f}, p={t['p_value']:.2g})" for o, t in tested if not t["significant"]]
    out = []
    if beats:
        out.append(f"accuracy: {acc:.3f}, significantly more accurate than {', '.join(beats)}")
    if beaten_by:
        out.append(f"accuracy: {acc:.3f}, significantly less accurate than {', '.join(beaten_by)}, which a hard "
                   "need or a larger gap ranks below it")
    if tied:
        out.append(f"accuracy: {acc:.3f} is not significantly different from {', '.join(tied)} (McNemar's exact "
                   "test at 95% on the same items), so accuracy does not decide between them; cost and needs do")
    if not beats and not beaten_by:
        out.append("accuracy: no measured option differs from this one beyond chance on these items; more items "
                   "would tell them apart, if anything does")
    if unpaired:
        out.append(f"accuracy: {', '.join(unpaired)} measured on other items; not compared")
    return out


def recommend(sc: Scenario, options: list[Option]) -> dict:
    """Rank the options against the needs and explain the choice."""
    n, q, months = sc.needs, sc.queries_per_month, sc.months
    assessed = []
    for opt in options:
        blockers, gaps, minor = _assess(opt, sc)
        monthly = opt.line.monthly(q, months)
        assessed.append({"option": opt, "blockers": blockers, "gaps": gaps, "minor_gaps": minor, "monthly": monthly,
                         "weighted": monthly * (1 + MINOR_GAP_PREMIUM * len(minor))})
    top = _accuracy_gaps(assessed)
    assessed.sort(key=lambda a: (len(a["blockers"]) > 0, len(a["gaps"]), a["weighted"]))
    best = assessed[0]
    win: Option = best["option"]
    reasons: list[str] = []
    if best["blockers"]:
        reasons.append("no option meets every hard need; this one comes closest: " + "; ".join(best["blockers"]))

    # volume and cost
    text = (f"volume: at {report.count(q)} queries/month it costs {report.usd(best['monthly'])}/month"
            + (f" (one-off {report.usd(win.line.one_off)} spread over {months:g} months)" if win.line.one_off else ""))
    others = [a for a in assessed if a is not best]
    if others:
        nxt = min(others, key=lambda a: a["monthly"])
        if nxt["monthly"] > best["monthly"]:
            text += f", the cheapest of all (next: {nxt['option'].name} at {report.usd(nxt['monthly'])})"
    reasons.append(text)
    for a in sorted(others, key=lambda a: a["monthly"])[:3]:
        pts = cost.crossovers(win.line, a["option"].line, months)
        if not pts:
            continue
        p = pts[0]
        winner_above = win.line.monthly(p * 1.001, months) < a["option"].line.monthly(p * 1.001, months)
        rel = "above" if winner_above else "below"
        reasons.append(f"break-even with {a['option'].name} at {report.count(round(p))} queries/month: "
                       f"{win.name} is the cheaper one {rel} it" + (" (stepped GPU costs cross again later)"
                                                                     if len(pts) > 1 else ""))
    if best["minor_gaps"]:
        reasons.append("cheap enough to accept a minor gap: " + "; ".join(best["minor_gaps"]))
    reasons += _accuracy_reasons(win, [a["option"] for a in others], top)

    # the needs, one by one
    if n.variety == "narrow" and win.finetuned:
        reasons.append("variety: requests are one narrow task, which a small finetuned model does well")
    elif n.variety == "broad" and not win.finetuned:
        reasons.append("variety: requests are open-ended, which calls for a large general model rather than a narrow finetune")
    elif n.variety == "narrow":
        reasons.append("variety: the task is narrow, so a finetuned small model is worth pricing if volume grows")
    if n.consistent_format:
        reasons.append("format: " + ("a finetune on your examples holds the format and tone"
                                     if win.finetuned else
                                     "prompting must carry the format: put examples in the prompt and validate outputs"))
    if n.examples_available is not None:
        if n.examples_available < MIN_FINETUNE_EXAMPLES:
            reasons.append(f"data: {report.count(n.examples_available)} examples are too few to finetune on; use them as few-shot "
                           "examples in the prompt")
        elif n.examples_available < GOOD_FINETUNE_EXAMPLES:
            reasons.append(f"data: {report.count(n.examples_available)} examples are enough for a LoRA finetune on a narrow task; "
                           "more help")
        else:
            reasons.append(f"data: {report.count(n.examples_available)} examples are plenty for a LoRA finetune")
    if n.private_knowledge:
        reasons.append("knowledge: " + ("retrieval grounds answers in your documents and stays current as they change"
                                        if win.rag else "this option has no retrieval; add RAG for your documents"))
    if n.budget_usd_per_month is not None:
        within = best["monthly"] <= n.budget_usd_per_month
        reasons.append(f"budget: {report.usd(best['monthly'])}/month is {'within' if within else 'over'} the "
                       f"{report.usd(n.budget_usd_per_month)} budget")
    if n.max_latency_s is not None:
        if win.latency_s is None:
            reasons.append(f"latency: unknown for this option; give tokens_per_s to check the "
                           f"{report.seconds(n.max_latency_s)} limit")
        else:
            ok = win.latency_s <= n.max_latency_s
            reasons.append(f"latency: ~{report.seconds(win.latency_s)} per query "
                           f"{'meets' if ok else 'misses'} the {report.seconds(n.max_latency_s)} limit")
    if n.data_must_stay_local:
        reasons.append("privacy: the data stays on machines you control" if win.local
                       else "privacy: this option sends data to an API although it must stay local")

    why_not = []
    for a in others:
        why = a["blockers"] + a["gaps"]
        if not why:
            why = a["minor_gaps"][:]
            if a["monthly"] > best["monthly"]:
                why.append(f"costs {report.usd(a['monthly'])}/month, {report.usd(a['monthly'] - best['monthly'])} more")
        why_not.append({"option": a["option"].name, "reasons": why})
    ranking = [{"option": a["option"].name, "usd_per_month": a["monthly"], "blockers": a["blockers"],
                "gaps": a["gaps"], "minor_gaps": a["minor_gaps"],
                "accuracy": a["option"].measured["accuracy"] if a["option"].measured else None} for a in assessed]
    return {"recommended": win.name, "reasons": reasons, "why_not": why_not, "ranking": ranking}
