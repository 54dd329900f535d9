"""Scenarios: options priced side by side, break-even volumes, the recommendation and its reasons, the chart."""

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
