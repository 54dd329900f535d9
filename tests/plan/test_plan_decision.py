"""Scenarios: options priced side by side, break-even volumes, the recommendation and its reasons, the chart."""

import json
from pathlib import Path

import pytest
import yaml

from lmforge.errors import LmforgeError
from lmforge.plan import decision
from lmforge.plan.commands import BreakevenPlanConfig, ComparePlanConfig, run_breakeven, run_compare
from lmforge.plan.prices import load_prices

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "scenario-example.yaml"


def _scenario(tmp_path, **over) -> Path:
    data = {
        "name": "t", "months": 12, "queries_per_month": 50_000, "input_tokens": 500, "output_tokens": 500,
        "needs": {"variety": "narrow", "consistent_format": True, "examples_available": 5000},
        "options": [
            {"name": "gpt-4", "kind": "api", "model": "gpt-4"},
            {"name": "tuned", "kind": "custom", "per_query": 0.025, "one_off": 24_000, "finetuned": True,
             "local": True},
        ],
    }
    for k, v in over.items():
        if k == "needs":
            data["needs"].update(v)
        else:
            data[k] = v
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_example_scenario_compares_and_draws(tmp_path, capsys):
    chart = tmp_path / "c.png"
    res = run_compare(ComparePlanConfig(scenario=str(EXAMPLE), chart=str(chart)))
    out = capsys.readouterr().out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(res["options"]) == 5
    assert res["recommendation"]["recommended"] in {o["name"] for o in res["options"]}
    assert res["recommendation"]["reasons"]
    assert "Break-even" in out and "Recommendation" in out and "->" in out
    # the finetune's bill is a one-off cost of the self-hosted option
    tuned = next(o for o in res["options"] if o["finetuned"])
    assert tuned["one_off"] > tuned["details"]["finetune"]["usd"] > 0


def test_breakeven_between_api_and_finetune(tmp_path, capsys):
    # gpt-4 costs $0.045 a query; the finetuned option $0.025 + $24,000 once: $2,000 a month over 12 months
    # (break-even at 100,000 a month)
    res = run_compare(ComparePlanConfig(scenario=str(_scenario(tmp_path)), chart="none", json=True,
                                        queries_per_month=20_000))
    capsys.readouterr()
    (pair,) = res["breakeven"]
    assert pair["queries_per_month"][0] == pytest.approx(100_000, rel=1e-6)
    assert pair["cheaper_above"] == ["tuned"]
    # at 20,000 a month the finetune costs 2.8x the API: worth more than holding the format, so the API wins...
    assert res["recommendation"]["recommended"] == "gpt-4"
    assert any("minor gap" in r for r in res["recommendation"]["reasons"])
    # ...at 50,000 the finetune costs 44% more, within what a held format is worth (MINOR_GAP_PREMIUM)...
    res = run_compare(ComparePlanConfig(scenario=str(_scenario(tmp_path)), chart="none", json=True))
    capsys.readouterr()
    assert res["recommendation"]["recommended"] == "tuned"
    # ...and above the break-even volume it is simply cheaper
    res = run_compare(ComparePlanConfig(scenario=str(_scenario(tmp_path)), chart="none", json=True,
                                        queries_per_month=200_000))
    capsys.readouterr()
    assert res["recommendation"]["recommended"] == "tuned"
    assert any("break-even" in r for r in res["recommendation"]["reasons"])


def test_hard_needs_rule_options_out(tmp_path, capsys):
    # data that must stay local rules out the API whatever it costs
    p = _scenario(tmp_path, queries_per_month=1000, needs={"data_must_stay_local": True})
    res = run_compare(ComparePlanConfig(scenario=str(p), chart="none", json=True))
    assert res["recommendation"]["recommended"] == "tuned"
    assert any("privacy" in r for r in res["recommendation"]["reasons"])
    # too few examples rule out the finetune
    p = _scenario(tmp_path, queries_per_month=10_000_000, needs={"examples_available": 20})
    res = run_compare(ComparePlanConfig(scenario=str(p), chart="none", json=True))
    assert res["recommendation"]["recommended"] == "gpt-4"
    why = {w["option"]: w["reasons"] for w in res["recommendation"]["why_not"]}
    assert "too few" in why["tuned"][0]
    # a budget both exceed: the closest is still named, and the reasons say so
    p = _scenario(tmp_path, needs={"budget_usd_per_month": 10})
    res = run_compare(ComparePlanConfig(scenario=str(p), chart="none", json=True))
    assert res["recommendation"]["reasons"][0].startswith("no option meets every hard need")
    capsys.readouterr()


def test_rag_and_self_hosting_are_priced(tmp_path):
    sc = decision.load_scenario(_scenario(tmp_path, needs={"private_knowledge": True}))
    table = load_prices()
    rag = decision.build_option({"name": "r", "kind": "api", "model": "gpt-4",
                                 "rag": {"context_tokens": 1000, "per_month": 50}}, sc, table)
    plain = decision.build_option({"name": "p", "kind": "api", "model": "gpt-4"}, sc, table)
    assert rag.line.per_query - plain.line.per_query == pytest.approx(1000 * 30 / 1e6)
    assert rag.line.per_month == 50 and rag.rag
    hosted = decision.build_option({"name": "h", "kind": "self_hosted", "model": "llama-3-8b", "gpu": "l4",
                                    "batch": 8}, sc, table)
    assert hosted.local and hosted.line.unit_per_month == pytest.approx(730 * table.gpu("l4").usd_per_hour)
    assert hosted.line.capacity_per_unit > 0 and hosted.latency_s > 0
    blockers, gaps, minor = decision._assess(plain, sc)
    assert any("retrieval" in g for g in gaps) and minor


@pytest.mark.parametrize("over,match", [
    ({"options": []}, "at least one option"),
    ({"options": [{"name": "x", "kind": "magic"}]}, "kind must be one of"),
    ({"options": [{"name": "x", "kind": "api", "model": "gpt-4", "colour": "red"}]}, "unknown keys"),
    ({"options": [{"name": "x", "kind": "api"}]}, "'model' is required"),
    ({"needs": {"variety": "wide"}}, "variety"),
    ({"queries": 5}, "unknown keys"),
])
def test_bad_scenarios(tmp_path, over, match):
    with pytest.raises(LmforgeError, match=match):
        run_compare(ComparePlanConfig(scenario=str(_scenario(tmp_path, **over)), chart="none"))


def test_breakeven_command(capsys):
    res = run_breakeven(BreakevenPlanConfig(one_off=2000, saving_per_query=0.02, queries_per_month=25_000))
    out = capsys.readouterr().out
    assert res["breakeven_queries"] == pytest.approx(100_000)
    assert res["breakeven_months"] == pytest.approx(4)
    assert "100,000 queries" in out
    res = run_breakeven(BreakevenPlanConfig(one_off=2000, per_query_a=0.045, per_query_b=0.025, json=True))
    assert res["breakeven_queries"] == pytest.approx(100_000)
    with pytest.raises(LmforgeError, match="not both"):
        run_breakeven(BreakevenPlanConfig(saving_per_query=0.01, per_query_a=0.02))
    with pytest.raises(LmforgeError, match="say what B saves"):
        run_breakeven(BreakevenPlanConfig(one_off=10))


# ---------------------------------------------------------------- measured options (an `lmforge compare` run)


def _compare_run(tmp_path, variants, usd_per_hour=1.0, name="cmp"):
    """A results.json laid out as `lmforge compare` writes it: variants (name, outcomes per item, tokens per
    machine-second, tokens in / out, kind) and every pair's paired test."""
    from lmforge.eval.compare import paired_tests
    from lmforge.eval.stats import wilson_interval

    rows = []
    for vname, correct, tps, tin, tout, kind in variants:
        k, n = sum(correct), len(correct)
        t = None if kind == "api" else {"tokens_per_s": tps, "tokens_per_s_range": [tps * 0.9, tps * 1.1],
                                        "machine_tokens_per_s": tps, "machine_tokens_per_s_range": [tps * 0.95, tps * 1.05],
                                        "latency_s": (tin + tout) / tps, "latency_s_range": [0.1, 0.2]}
        rows.append({"variant": {"name": vname, "model": f"runs/{vname}", "kind": kind, "rag": None, "shots": 0},
                     "summary": {"n": n, "correct": k, "accuracy": k / n, "ci95": list(wilson_interval(k, n)),
                                 "prompt_tokens": tin, "output_tokens": tout, "latency_s": 0.5},
                     "timing": t, "price": {"input_usd_per_1m": 0.15, "output_usd_per_1m": 0.6} if kind == "api" else None,
                     "cost_basis": "x", "usd_per_1k": None})
    out = tmp_path / name
    out.mkdir()
    pairs = paired_tests([v[0] for v in variants], {v[0]: v[1] for v in variants}, 0)
    (out / "results.json").write_text(json.dumps({"command": "lmforge compare ...", "task": "t.jsonl", "n": len(variants[0][1]),
                                                  "baseline": variants[0][0], "usd_per_hour": usd_per_hour,
                                                  "timing": {"threads": 1}, "paired": pairs, "variants": rows}))
    return out


def test_measured_costs_come_from_the_one_formula(tmp_path, capsys):
    from lmforge.plan.cost import throughput_price, usd_per_1k_queries

    run = _compare_run(tmp_path, [("base", [True] * 30 + [False] * 70, 400.0, 90.0, 10.0, "local"),
                                  ("api", [True] * 32 + [False] * 68, None, 120.0, 3.0, "api")], usd_per_hour=0.5)
    res = run_compare(ComparePlanConfig(measured=str(run), chart="none", json=True, queries_per_month=10_000))
    capsys.readouterr()
    opts = {o["name"]: o for o in res["options"]}
    assert opts["base"]["per_query"] * 1000 == pytest.approx(usd_per_1k_queries(throughput_price(400.0, 0.5), 90, 10))
    assert opts["api"]["per_query"] * 1000 == pytest.approx((120 * 0.15 + 3 * 0.6) / 1000)
    assert opts["base"]["local"] and not opts["api"]["local"] and opts["base"]["measured"]["accuracy"] == 0.30
    # repriced at another machine's rate, through the same formula
    res = run_compare(ComparePlanConfig(measured=str(run), chart="none", json=True, usd_per_hour=2.0))
    capsys.readouterr()
    base = next(o for o in res["options"] if o["name"] == "base")
    assert base["per_query"] * 1000 == pytest.approx(usd_per_1k_queries(throughput_price(400.0, 2.0), 90, 10))


def test_no_winner_for_an_advantage_that_is_not_significant(tmp_path, capsys):
    """tuned answers 36/100 to base's 30/100, on 8 items base missed and missing 2 base got: McNemar p = 0.11.
    The cheaper base wins, and the reasons say the accuracies do not differ beyond chance."""
    base = [True] * 30 + [False] * 70
    tuned = [True] * 28 + [False] * 2 + [True] * 8 + [False] * 62
    run = _compare_run(tmp_path, [("base", base, 1000.0, 100.0, 10.0, "local"),
                                  ("tuned", tuned, 500.0, 100.0, 10.0, "local")])
    res = run_compare(ComparePlanConfig(measured=str(run), chart="none", json=True))
    capsys.readouterr()
    rec = res["recommendation"]
    assert rec["recommended"] == "base"
    assert any("not significantly different from tuned" in r for r in rec["reasons"])
    assert not any("significantly more accurate" in r for r in rec["reasons"])
    assert all("accurate" not in g for r in rec["ranking"] for g in r["gaps"])


def test_a_significantly_better_option_wins_over_a_cheaper_one(tmp_path, capsys):
    base = [True] * 30 + [False] * 70
    tuned = [True] * 30 + [True] * 30 + [False] * 40  # 30 more right, none fewer: p ~ 2e-9
    run = _compare_run(tmp_path, [("base", base, 1000.0, 100.0, 10.0, "local"),
                                  ("tuned", tuned, 500.0, 100.0, 10.0, "local")])
    res = run_compare(ComparePlanConfig(measured=str(run), chart="none", json=True))
    out = capsys.readouterr().out
    rec = res["recommendation"]
    assert rec["recommended"] == "tuned"
    assert any(r.startswith("accuracy: 0.600, significantly more accurate than base") for r in rec["reasons"])
    why = next(w for w in rec["why_not"] if w["option"] == "base")
    assert any("significantly less accurate than tuned" in r for r in why["reasons"])
    res = run_compare(ComparePlanConfig(measured=str(run), chart="none"))
    assert "accuracy" in capsys.readouterr().out  # the table shows each option's measured accuracy
    assert out


def test_measured_options_in_a_scenario_and_their_errors(tmp_path, capsys):
    run = _compare_run(tmp_path, [("base", [True] * 5 + [False] * 5, 100.0, 10.0, 1.0, "local"),
                                  ("other", [True] * 6 + [False] * 4, 100.0, 10.0, 1.0, "local")])
    other = _compare_run(tmp_path, [("x", [True] * 9 + [False], 100.0, 10.0, 1.0, "local")], name="cmp2")
    p = _scenario(tmp_path, options=[{"name": "mine", "kind": "measured", "results": str(run), "variant": "other"},
                                     {"name": "x", "kind": "measured", "results": str(other)},
                                     {"name": "gpt-4", "kind": "api", "model": "gpt-4"}])
    res = run_compare(ComparePlanConfig(scenario=str(p), chart="none", json=True))
    capsys.readouterr()
    mine = next(o for o in res["options"] if o["name"] == "mine")
    assert mine["measured"]["variant"] == "other" and mine["kind"] == "measured"
    # options from different compare runs were scored on different items: never compared on accuracy
    rec = res["recommendation"]
    assert all("accurate than" not in g for r in rec["ranking"] for g in r["gaps"])
    for opts, msg in (([{"name": "m", "kind": "measured", "results": str(run), "variant": "zz"}], "no variant 'zz'"),
                      ([{"name": "m", "kind": "measured", "results": str(tmp_path / "none")}], "does not exist"),
                      ([{"name": "m", "kind": "measured"}], "'results' is required")):
        with pytest.raises(LmforgeError, match=msg):
            run_compare(ComparePlanConfig(scenario=str(_scenario(tmp_path, options=opts)), chart="none", json=True))
    with pytest.raises(LmforgeError, match="--measured DIR"):
        run_compare(ComparePlanConfig(chart="none"))
