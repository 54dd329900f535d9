"""`lmforge plan decide`: compare runs -> the decision (monthly costs at volumes, the finetune's one-off and
break-even, a recommendation that names no winner for an advantage the paired test does not show), in
decision.md with its chart."""

import json

import pytest

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.plan.cost import throughput_price, usd_per_1k_queries
from lmforge.plan.decide import DecidePlanConfig, build
from tests.plan.test_plan_decision import _compare_run

N = 100
PROMPT = [True] * 40 + [False] * 60
RAG = [True] * 40 + [True] * 35 + [False] * 25  # 35 more right than prompt, none fewer: p ~ 6e-11
LORA = [True] * 38 + [False] * 2 + [True] * 4 + [False] * 56  # 42 right: not different from prompt
LORA_RAG = RAG[:74] + [False] + [True] + RAG[76:]  # 75 right, one item swapped: tied with rag


def _runs(tmp_path):
    mc = _compare_run(tmp_path, [("prompt", PROMPT, 400.0, 160.0, 0.0, "local"),
                                 ("rag", RAG, 400.0, 500.0, 0.0, "local"),
                                 ("lora", LORA, 400.0, 160.0, 0.0, "local"),
                                 ("lora-rag", LORA_RAG, 400.0, 500.0, 0.0, "local")], name="mc")
    # the generative run prices a query: prompt + generated answer at the measured speed (lora answers tersely)
    qa = _compare_run(tmp_path, [("prompt", PROMPT[:40], 50.0, 60.0, 40.0, "local"),
                                 ("rag", RAG[:40], 100.0, 400.0, 40.0, "local"),
                                 ("lora", LORA[:40], 50.0, 60.0, 12.0, "local"),
                                 ("lora-rag", LORA_RAG[:40], 100.0, 400.0, 12.0, "local")], usd_per_hour=0.1, name="qa")
    ft = tmp_path / "lora-run"
    ft.mkdir()
    (ft / "summary.json").write_text(json.dumps({
        "compute": {"seconds": 180.0, "device": "cpu"}, "training": {"tokens": 36000, "steps": 35, "epochs": 0.15},
        "data": {"train_examples": 3946}, "model": {"method": "LoRA"}}))
    return mc, qa, ft


def _cfg(mc, qa, ft, **kw):
    return DecidePlanConfig(compare=[str(mc), str(qa)], finetune=[f"lora={ft}", f"lora-rag={ft}"], **kw)


def test_costs_one_off_and_break_even_from_the_measurements(tmp_path):
    mc, qa, ft = _runs(tmp_path)
    d, _ = build(_cfg(mc, qa, ft, usd_per_hour=0.1))
    opts = {o["name"]: o for o in d["options"]}
    per_q = {n: usd_per_1k_queries(throughput_price(tps, 0.1), tin, tout) / 1000
             for n, tps, tin, tout in (("prompt", 50, 60, 40), ("rag", 100, 400, 40), ("lora", 50, 60, 12),
                                       ("lora-rag", 100, 400, 12))}
    for n, q in per_q.items():
        assert opts[n]["usd_per_query"] == pytest.approx(q)
    one_off = 180 / 3600 * 0.1  # measured training seconds x $/hour
    assert opts["lora"]["one_off"] == pytest.approx(one_off) and opts["prompt"]["one_off"] == 0
    assert d["monthly"]["lora"][10000.0] == pytest.approx(per_q["lora"] * 10000 + one_off / 12)
    be = {(b["finetune"], b["instead_of"]): b for b in d["breakeven"]}
    assert be[("lora", "prompt")]["queries_to_pay_back"] == pytest.approx(one_off / (per_q["prompt"] - per_q["lora"]))
    # the API: the price table's list price at the baseline's measured tokens per query
    api = d["api"][0]
    assert api["name"] == "gpt-4o-mini (API)" and api["usd_per_query"] == pytest.approx((60 * 0.15 + 40 * 0.6) / 1e6)
    assert accuracy_of(d, "rag") == 0.75 and d["options"][0]["ci95"][0] < 0.40 < d["options"][0]["ci95"][1]


def accuracy_of(d, name):
    return next(o["accuracy"] for o in d["options"] if o["name"] == name)


def test_recommendation_only_claims_significant_accuracy(tmp_path):
    """rag and lora-rag are significantly more accurate than prompt and lora, and not different from each other:
    the winner is one of the two, chosen for cost, and the report says accuracy does not separate them."""
    mc, qa, ft = _runs(tmp_path)
    d, _ = build(_cfg(mc, qa, ft, usd_per_hour=0.1))
    win, other = d["recommended"], "rag"
    # lora-rag answers in fewer tokens: cheaper per query than rag, and its one-off ($0.005) is paid back early
    assert win == "lora-rag" and d["same_at_every_volume"]
    be = {(b["finetune"], b["instead_of"]): b for b in d["breakeven"]}
    per_q_saving = (440 - 412) / 100 / 3600 * 0.1
    assert be[("lora-rag", "rag")]["queries_to_pay_back"] == pytest.approx(180 / 3600 * 0.1 / per_q_saving)
    assert d["standing"]["tied"] == [other] and sorted(d["standing"]["better"]) == ["lora", "prompt"]
    why_not = {w["option"]: w["reasons"] for w in d["recommendation"][-1]["why_not"]}
    assert any("significantly less accurate" in r for r in why_not["prompt"])
    assert not any("accurate" in r for r in why_not[other])  # ranked on cost, not on a tie
    assert all(r["recommended"] != "gpt-4o-mini (API)" for r in d["recommendation"])  # unmeasured: never picked


def test_decision_md_chart_and_cli(tmp_path, capsys):
    mc, qa, ft = _runs(tmp_path)
    timings = tmp_path / "t.tsv"
    timings.write_text("prepare\t40\nfinetune\t200\n")
    out = tmp_path / "decision"
    assert main(["plan", "decide", "--compare", str(mc), "--compare", str(qa), "--finetune", f"lora={ft}",
                 "--finetune", f"lora-rag={ft}", "--usd-per-hour", "0.1", "--timings", str(timings),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "decision.md").read_text()
    assert printed.strip() == md.strip()
    for part in ("**Recommended: `lora-rag`** at every volume", "not significantly different in accuracy from", "## The evidence",
                 "## What each costs", "$/month at 100,000", "gpt-4o-mini (API)", "Break-even", "pays back after",
                 "| total | 240 |", "![accuracy and monthly cost](decision.png)"):
        assert part in md, part
    png = (out / "decision.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    data = json.loads((out / "decision.json").read_text())
    assert data["recommended"] == "lora-rag" and data["timings"] == [["prepare", 40.0], ["finetune", 200.0]]


def test_errors(tmp_path, capsys):
    mc, qa, ft = _runs(tmp_path)
    other = _compare_run(tmp_path, [("prompt", PROMPT, 400.0, 160.0, 0.0, "local")], name="other")
    for cfg, msg in ((DecidePlanConfig(), "--compare DIR"),
                     (DecidePlanConfig(compare=[str(other), str(qa)]), "no variant"),
                     (DecidePlanConfig(compare=[str(mc), str(qa)], finetune=["lora"]), "VARIANT=RUN_DIR"),
                     (DecidePlanConfig(compare=[str(mc), str(qa)], finetune=[f"zz={ft}"]), "do not have"),
                     (DecidePlanConfig(compare=[str(mc), str(qa)], finetune=[f"lora={tmp_path}"]), "summary.json"),
                     (DecidePlanConfig(compare=[str(mc), str(qa)], volumes=[0.0]), "positive")):
        with pytest.raises(LmforgeError, match=msg):
            build(cfg)
    assert main(["plan", "decide"]) == 2
    assert "--compare DIR" in capsys.readouterr().err
