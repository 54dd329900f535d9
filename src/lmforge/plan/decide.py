"""`lmforge plan decide`: measured variants -> the decision, in one decision.md with a chart.

    lmforge plan decide --compare runs/x/compare-mc --compare runs/x/compare-qa --finetune lora=runs/x/lora \
        --finetune lora-rag=runs/x/lora --api gpt-4o-mini --usd-per-hour 0.096 --out runs/x/decision

It answers "prompt, few-shot, RAG or finetune, and what does each cost?" from `lmforge compare` runs of the same
variants, and nothing else:
  - accuracy: the first --compare run's (e.g. multiple choice, log-likelihood: the most items per second of
    evidence), with its Wilson intervals and its paired tests (McNemar's exact test); every later run (e.g. a
    generative metric on short reference answers) is shown beside it with its own paired tests, and the
    recommendation says where it agrees and where it contradicts;
  - cost: per query, machine time at the measured speed of the --cost-from run (default: the last --compare, whose
    queries are real answers: prompt + generated tokens, as a user asks), through decision.build_option's
    `kind: measured` (so plan.cost.usd_per_1k_queries, the one formula); a finetuned variant adds its one-off cost,
    the finetune run's measured training seconds (summary.json) x the same $/hour, spread over --months;
  - an API model from the price table at the baseline variant's measured tokens per query: a cost reference only.
    It was not measured on these items, so it is never recommended here; `lmforge compare --variant
    api=openai:MODEL@URL` measures one;
  - monthly cost at each --volumes figure, each finetune's break-even volume against every option it could replace
    (when it is cheaper per query at all), and the recommendation at each volume by decision.recommend: an option
    significantly less accurate than the most accurate one is ranked down, a difference that is not significant
    decides nothing, and cost decides among the rest. So a winner is only ever named for an advantage the paired
    test shows, or, among options it cannot tell apart, for being cheaper, and the reasons say which.
The step timings of the run that produced the evidence (--timings: a TSV of step and seconds, as ./run.sh writes)
go into the report, with the machine's load average as compare recorded it.

Writes --out/decision.md, decision.json and decision.png (accuracy with its intervals; monthly cost against volume).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import opt
from lmforge.errors import LmforgeError
from lmforge.plan import calibrate, cost, decision, report
from lmforge.plan.report import count, usd


@dataclass
class DecidePlanConfig:
    compare: list[str] = opt(help="`lmforge compare` --out directory (repeat): the first decides accuracy, later ones "
                             "(e.g. a generative metric) are reported beside it", default_factory=list)
    cost_from: str = opt("", help="the compare run whose measured speed prices a query (default: the last --compare)")
    finetune: list[str] = opt(help="VARIANT=RUN_DIR: the variant's model was finetuned in RUN_DIR; its measured "
                              "training time x $/hour is a one-off cost (repeat)", default_factory=list)
    api: list[str] = opt(help="API models from the price table, priced at the baseline's tokens per query "
                         "(a cost reference, not measured here; repeat)", default_factory=lambda: ["gpt-4o-mini"])
    usd_per_hour: float | None = opt(None, help="what the machine costs per hour, $ (default: the compare runs' rate)")
    volumes: list[float] = opt(help="queries per month to price every option at (repeat)",
                               default_factory=lambda: [1000.0, 10000.0, 100000.0])
    months: float = opt(12.0, help="horizon over which one-off costs (the finetune) are spread")
    timings: str = opt("", help="TSV of step<TAB>seconds to report (./run.sh writes one)")
    out: str = opt("decision", help="directory for decision.md, decision.json and decision.png")
    prices: str | None = opt(None, help="YAML extending plan's price table")
    json: bool = opt(False, help="print decision.json instead of decision.md")


def _finetunes(specs: list[str]) -> dict[str, dict]:
    """VARIANT=RUN_DIR -> the run's measured training figures (summary.json of `lmforge finetune`)."""
    out = {}
    for spec in specs:
        name, eq, run = spec.partition("=")
        if not eq or not name.strip() or not run.strip():
            raise LmforgeError(f"--finetune {spec!r} is not VARIANT=RUN_DIR")
        f = Path(run.strip()) / "summary.json"
        try:
            s = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LmforgeError(f"--finetune {spec}: cannot read {f} ({e}); point at a finished `lmforge finetune` "
                               "run directory") from None
        c, t, d = s.get("compute") or {}, s.get("training") or {}, s.get("data") or {}
        if not isinstance(c.get("seconds"), (int, float)):
            raise LmforgeError(f"--finetune {spec}: {f} records no training time (compute.seconds)")
        out[name.strip()] = {"run": str(Path(run.strip())), "seconds": float(c["seconds"]),
                             "tokens": t.get("tokens"), "steps": t.get("steps"), "epochs": t.get("epochs"),
                             "examples": d.get("train_examples") or d.get("records"),
                             "method": (s.get("model") or {}).get("method"), "device": c.get("device")}
    return out


def _timings(path: str) -> list[tuple[str, float]]:
    if not path:
        return []
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise LmforgeError(f"--timings {path}: {e}") from None
    for line in lines:
        if line.strip():
            step, _, sec = line.rpartition("\t")
            try:
                rows.append((step, float(sec)))
            except ValueError:
                raise LmforgeError(f"--timings {path}: {line!r} is not STEP<TAB>SECONDS") from None
    return rows


def _evidence(run: dict, names: list[str]) -> dict:
    """What one compare run says about each variant: accuracy (and mean score), and every pair's tests."""
    f, data = calibrate.read_compare(run["results"])
    rows = {r["variant"]["name"]: r for r in data["variants"]}
    missing = [n for n in names if n not in rows]
    if missing:
        raise LmforgeError(f"{f} has no variant {', '.join(missing)}; every --compare run must score the same "
                           "variants (by name)")
    per = {}
    for n in names:
        s = rows[n]["summary"]
        per[n] = {"accuracy": s["accuracy"], "ci95": s["ci95"], "mean_score": s.get("mean_score"),
                  "score_ci95": s.get("score_ci95")}
    return {"results": run["results"], "task": data.get("task"), "metric": data.get("metric"), "n": data.get("n"),
            "baseline": data.get("baseline"), "command": data.get("command"), "timing": data.get("timing", {}),
            "paired": data["paired"], "variants": per}


def _verdict(ev: dict, a: str, b: str) -> tuple[str, dict | None]:
    """How b compares with a in one run: 'better' / 'worse' / 'tied' by its paired test (the graded one if any)."""
    t = calibrate.paired_test(ev["paired"], a, b)
    if t is None:
        return "untested", None
    graded = t.get("score")
    use = graded if graded else t
    if not use["significant"]:
        return "tied", use
    return ("better" if use["diff"] > 0 else "worse"), use


def _fmt_test(t: dict | None) -> str:
    if t is None:
        return "-"
    return f"{t['diff']:+.3f} (p={t['p_value']:.2g}{', significant' if t['significant'] else ''})"


def build(cfg: DecidePlanConfig) -> tuple[dict, list[cost.CostLine]]:
    """The decision as data (what decision.json holds), and every option's cost line (measured, then API)."""
    from lmforge.plan.prices import load_prices

    if not cfg.compare:
        raise LmforgeError("give the evidence: --compare DIR (the --out of `lmforge compare`; repeat for more metrics)")
    if cfg.months <= 0 or not cfg.volumes or any(v <= 0 for v in cfg.volumes):
        raise LmforgeError("--months and every --volumes figure must be positive")
    table = load_prices(cfg.prices)
    cost_dir = cfg.cost_from or cfg.compare[-1]
    priced = calibrate.calibrate_compare(cost_dir, cfg.usd_per_hour)
    rate = priced["usd_per_hour"]
    names = [v["name"] for v in priced["variants"]]
    runs = [_evidence(calibrate.calibrate_compare(d, cfg.usd_per_hour), names) for d in cfg.compare]
    primary = runs[0]
    fts = _finetunes(cfg.finetune)
    unknown = [n for n in fts if n not in names]
    if unknown:
        raise LmforgeError(f"--finetune names {', '.join(unknown)}, which the compare runs do not have "
                           f"(variants: {', '.join(names)})")
    examples = max((f["examples"] or 0 for f in fts.values()), default=0) or None
    base = next(v for v in priced["variants"] if v["name"] == (priced["baseline"] or names[0]))
    sc = decision.Scenario(name="decision", months=cfg.months, queries_per_month=cfg.volumes[0],
                           input_tokens=base["tokens_in"], output_tokens=base["tokens_out"],
                           needs=decision.Needs(variety="", examples_available=examples))

    options: list[decision.Option] = []
    for i, n in enumerate(names):
        raw = {"name": n, "kind": "measured", "results": cost_dir, "variant": n, "usd_per_hour": rate}
        if n in fts:
            fts[n]["usd"] = fts[n]["seconds"] / 3600 * rate
            raw.update(finetuned=True, one_off=fts[n]["usd"])
        opt = decision.build_option(raw, sc, table, i)
        acc = primary["variants"][n]
        # accuracy and its tests from the primary run; cost and latency from the run that priced queries
        opt.measured = {"results": primary["results"], "variant": n, "accuracy": acc["accuracy"], "ci95": acc["ci95"],
                        "n": primary["n"], "paired": primary["paired"]}
        options.append(opt)
    apis = [decision.build_option({"name": f"{m} (API)", "kind": "api", "model": m}, sc, table, len(names) + j)
            for j, m in enumerate(cfg.api)]

    by_volume = []
    for q in cfg.volumes:
        sc.queries_per_month = q
        rec = decision.recommend(sc, options)
        by_volume.append({"queries_per_month": q, **rec})
    win = by_volume[-1]["recommended"]
    same = all(r["recommended"] == win for r in by_volume)

    # where the winner stands on the primary run's accuracy, by its paired tests
    standing: dict[str, list[str]] = {"better": [], "tied": [], "worse": [], "untested": []}
    for n in names:
        if n != win:
            standing[_verdict(primary, n, win)[0]].append(n)
    # the recommendation's evidence in every other run
    agree = []
    for ev in runs[1:]:
        for n in names:
            if n == win:
                continue
            verdict, t = _verdict(ev, n, win)
            agree.append({"run": ev["results"], "metric": ev["metric"], "other": n, "winner_is": verdict,
                          "test": t})

    monthly = {o.name: {q: o.line.monthly(q, cfg.months) for q in cfg.volumes} for o in options + apis}
    breakevens = []
    for o in options:
        if not o.finetuned:
            continue
        for other in options + apis:
            if other is o or other.finetuned:
                continue
            saving = other.line.per_query - o.line.per_query
            total = cost.breakeven(o.line.one_off, saving)
            per_month = cost.crossovers(o.line, other.line, cfg.months)
            breakevens.append({"finetune": o.name, "instead_of": other.name, "one_off": o.line.one_off,
                               "saving_per_query": saving, "queries_to_pay_back": total,
                               "queries_per_month": per_month[0] if per_month else None})
    return {"verb": "plan decide", "usd_per_hour": rate, "months": cfg.months, "volumes": cfg.volumes,
            "cost_from": cost_dir, "evidence": runs, "finetunes": fts,
            "options": [_option_json(o, priced) for o in options], "api": [_option_json(o, None) for o in apis],
            "monthly": monthly, "breakeven": breakevens, "recommendation": by_volume, "recommended": win,
            "same_at_every_volume": same, "standing": standing, "agreement": agree, "timings": _timings(cfg.timings),
            "prices": {"files": table.files, "date": table.date}}, [o.line for o in options + apis]


def _option_json(o: decision.Option, priced: dict | None) -> dict:
    m = o.details.get("measured") or {}
    inf = o.details.get("inference") or {}
    return {"name": o.name, "kind": o.kind, "finetuned": o.finetuned, "rag": o.rag, "one_off": o.line.one_off,
            "usd_per_query": o.line.per_query, "usd_per_1k": o.line.per_query * 1000, "latency_s": o.latency_s,
            "model": m.get("model") or inf.get("model"), "shots": m.get("shots", 0), "tokens_in": m.get("tokens_in",
            inf.get("input_tokens")), "tokens_out": m.get("tokens_out", inf.get("output_tokens")),
            "tokens_per_s": m.get("tokens_per_s"), "rag_index": (m.get("prompt") or {}).get("rag"),
            "accuracy": o.measured["accuracy"] if o.measured else None,
            "ci95": o.measured["ci95"] if o.measured else None,
            "price_basis": m.get("price_basis") or (f"{inf.get('model')} list price ${inf.get('input_usd_per_1m'):g} in / "
                                                    f"${inf.get('output_usd_per_1m'):g} out per 1M tokens"
                                                    f" ({inf.get('price_date')})" if inf else "")}


# ---- the report ---------------------------------------------------------------------------------------
def _ci(ci: list[float] | None) -> str:
    return "-" if not ci else f"{ci[0]:.3f} - {ci[1]:.3f}"


def markdown(d: dict, chart: str | None) -> str:
    md = report.markdown_table
    primary, win = d["evidence"][0], d["recommended"]
    opts = {o["name"]: o for o in d["options"]}
    names = list(opts)
    half = max((o["ci95"][1] - o["ci95"][0]) / 2 for o in d["options"])
    lines = ["# The decision: prompt, few-shot, RAG or finetune?", ""]
    rec = d["recommendation"]
    if d["same_at_every_volume"]:
        lines += [f"**Recommended: `{win}`** at every volume priced ({', '.join(count(q) for q in d['volumes'])} "
                  "queries/month).", ""]
    else:
        lines += ["**Recommended:** " + "; ".join(f"`{r['recommended']}` at {count(r['queries_per_month'])}/month"
                                                 for r in rec), ""]
    st = d["standing"]
    said = []
    if st["better"]:
        said.append(f"significantly more accurate than {', '.join(f'`{n}`' for n in st['better'])}")
    if st["tied"]:
        said.append(f"not significantly different in accuracy from {', '.join(f'`{n}`' for n in st['tied'])}, "
                    "so among those it is chosen for what it costs, not for being more accurate")
    if st["worse"]:
        said.append(f"significantly less accurate than {', '.join(f'`{n}`' for n in st['worse'])}, which a "
                    "hard need or a larger gap ranks below it")
    if said:
        lines += [f"On {primary['metric']} accuracy ({primary['n']} items, paired McNemar tests at 95%) it is "
                  + "; ".join(said) + ".", ""]
    lines += ["Why:", ""] + [f"- {r}" for r in rec[-1]["reasons"]]
    for a in d["agreement"]:
        metric = a["metric"]
        word = {"better": "significantly better than", "worse": "significantly worse than",
                "tied": "not significantly different from", "untested": "not tested against"}[a["winner_is"]]
        lines.append(f"- {metric}: `{win}` is {word} `{a['other']}` ({_fmt_test(a['test'])})")
    lines += [""] + [f"- not `{w['option']}`: {'; '.join(w['reasons']) or 'no worse on any need; costs more'}"
                     for w in rec[-1]["why_not"]]
    if chart:
        lines += ["", f"![accuracy and monthly cost]({chart})"]

    lines += ["", "## The evidence", "",
              f"The same {primary['n']} held-out items for every variant, metric `{primary['metric']}` "
              f"({primary['task']}); 95% intervals are Wilson's (about ±{half:.2f} here), tests are paired against "
              f"`{primary['baseline']}` (McNemar's exact test; * at p < 0.05).", ""]
    body = []
    for n in names:
        v = primary["variants"][n]
        t = calibrate.paired_test(primary["paired"], primary["baseline"], n) if n != primary["baseline"] else None
        body.append([n, f"{v['accuracy']:.3f}", _ci(v["ci95"]),
                     "-" if t is None else f"{t['diff']:+.3f}" + (" *" if t["significant"] else ""),
                     "-" if t is None else f"{t['p_value']:.2g}"])
    lines.append(md(["variant", "accuracy", "95% CI", f"vs {primary['baseline']}", "p"], body))
    for ev in d["evidence"][1:]:
        graded = ev["variants"][names[0]]["mean_score"] is not None
        lines += ["", f"Beside it, metric `{ev['metric']}` on {ev['n']} items ({ev['task']})"
                  + (": the mean score with a bootstrap interval; tests are paired sign-flip permutation tests on "
                     "the scores" if graded else "") + ".", ""]
        body = []
        for n in names:
            v = ev["variants"][n]
            verdict, t = _verdict(ev, ev["baseline"], n) if n != ev["baseline"] else ("", None)
            body.append([n, f"{v['mean_score']:.3f}" if graded else f"{v['accuracy']:.3f}",
                         _ci(v["score_ci95"] if graded else v["ci95"]),
                         "-" if t is None else f"{t['diff']:+.3f}" + (" *" if t["significant"] else ""),
                         "-" if t is None else f"{t['p_value']:.2g}"])
        lines.append(md(["variant", f"mean {ev['metric']}" if graded else "accuracy", "95% CI",
                         f"vs {ev['baseline']}", "p"], body))

    lines += ["", "## What each costs", "",
              f"Per query: machine time at the speed measured in `{d['cost_from']}` (its queries are "
              f"generated answers) at ${d['usd_per_hour']:g}/hour; one-off: the finetune's measured training time "
              f"at the same rate, spread over {d['months']:g} months. API: list price at the baseline's tokens per "
              "query (a reference: not measured on these items, so never recommended here).", ""]
    body = []
    for o in d["options"] + d["api"]:
        body.append([o["name"], "-" if o["latency_s"] is None else report.seconds(o["latency_s"]),
                     f"{o['tokens_in']:.0f} + {o['tokens_out']:.0f}" if o["tokens_in"] is not None else "-",
                     usd(o["usd_per_1k"]), usd(o["one_off"]) if o["one_off"] else "-"]
                    + [usd(d["monthly"][o["name"]][q]) for q in d["volumes"]])
    lines.append(md(["option", "latency", "tokens in + out", "$ / 1k queries", "one-off"]
                    + [f"$/month at {count(q)}" for q in d["volumes"]], body))
    if d["finetunes"]:
        lines += ["", "The finetunes:", ""]
        for name, f in d["finetunes"].items():
            lines.append(f"- `{name}`: {f['method'] or 'finetune'} in {f['run']}, {report.seconds(f['seconds'])} of "
                         f"training ({count(f['tokens'])} tokens, {count(f['steps'])} steps, "
                         f"{f['epochs']:.2f} epochs of {count(f['examples'])} examples) = {usd(f.get('usd'))} at "
                         f"${d['usd_per_hour']:g}/hour")
        be = [b for b in d["breakeven"]]
        if be:
            lines += ["", "Break-even: the queries after which a finetune's one-off is paid back by its lower cost per "
                      "query (per month: where the monthly costs cross, one-off spread over the horizon).", ""]
            lines.append(md(["finetune", "instead of", "saving / 1k queries", "pays back after", "break-even / month"],
                            [[b["finetune"], b["instead_of"], usd(b["saving_per_query"] * 1000),
                              "never (not cheaper per query)" if math.isinf(b["queries_to_pay_back"])
                              else f"{count(round(b['queries_to_pay_back']))} queries",
                              "-" if b["queries_per_month"] is None else count(round(b["queries_per_month"]))]
                             for b in be]))

    timing = primary["timing"] or {}
    load = [f"{w} {'/'.join(f'{x:g}' for x in timing[k])}" for w, k in (("before", "loadavg_before"),
                                                                       ("after", "loadavg_after")) if timing.get(k)]
    lines += ["", "## How it was measured", ""]
    for ev in d["evidence"]:
        t = ev["timing"] or {}
        lines.append(f"- `{ev['command']}`" + (f" ({t.get('threads')} thread(s); load average "
                                              f"{', '.join(load) if ev is primary else ''})" if ev is primary and load
                                              else ""))
    if d["timings"]:
        total = sum(s for _, s in d["timings"])
        lines += ["", f"Steps of the run ({report.seconds(total)} in all, {total / 60:.1f} min):", ""]
        lines.append(md(["step", "seconds"], [[s, f"{x:.0f}"] for s, x in d["timings"]] + [["total", f"{total:.0f}"]]))
    lines += ["", f"Prices: {', '.join(d['prices']['files'])} (table dated {d['prices']['date']}).", ""]
    return "\n".join(lines)


def run(cfg: DecidePlanConfig) -> dict:
    import sys

    from lmforge.plan.chart import decision_chart

    d, lines = build(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    chart = decision_chart([(o["name"], o["accuracy"], o["ci95"]) for o in d["options"]],
                           f"{d['evidence'][0]['metric']}, {d['evidence'][0]['n']} items", lines, d["months"],
                           d["volumes"], out / "decision.png", highlight=d["recommended"])
    d["chart"] = str(chart)
    text = markdown(d, chart.name)
    (out / "decision.md").write_text(text)
    (out / "decision.json").write_text(report.to_json(d) + "\n")
    print(report.to_json(d) if cfg.json else text)
    print(f"wrote {out}/decision.md, decision.json, decision.png", file=sys.stderr)
    return d
