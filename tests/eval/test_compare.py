"""`lmforge compare` end to end on a tiny model: variants, the tables, the JSON, the chart; variant parsing; the
timing protocol (two copies of one model agree within its tolerance); the paired tests against the baseline."""

import json
import shutil

import pytest

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.compare import cost_per_1k, parse_variant
from lmforge.plan.cost import self_hosted_cost_per_query
from tests.eval.conftest import MC


def test_parse_variant():
    v = parse_variant("rag=runs/x/final,rag=indexes/docs,shots=2,top_k=4,chat=off")
    assert (v.name, v.model, v.rag, v.shots, v.top_k, v.chat) == ("rag", "runs/x/final", "indexes/docs", 2, 4, "off")
    assert parse_variant("base=DIR").shots == 0
    for bad, msg in (("justadir", "NAME=MODEL_DIR"), ("a=b,shots=x", "integer"), ("a=b,temp=1", "unknown option"),
                     ("a=b,chat=maybe", "auto, on or off")):
        with pytest.raises(LmforgeError, match=msg):
            parse_variant(bad)


def test_parse_api_variant():
    v = parse_variant("api=openai:gpt-4o-mini@http://127.0.0.1:8000/v1,shots=2,usd_per_1m_in=0.5,usd_per_1m_out=1.5")
    assert v.is_api and (v.api_model, v.base_url, v.shots) == ("gpt-4o-mini", "http://127.0.0.1:8000/v1", 2)
    assert (v.usd_per_1m_in, v.usd_per_1m_out) == (0.5, 1.5)
    assert not parse_variant("local=runs/x/final").is_api
    for bad, msg in (("a=openai:gpt-4o", "openai:MODEL@BASE_URL"), ("a=openai:@http://h/v1", "openai:MODEL@BASE_URL"),
                     ("a=openai:m@http://h/v1,chat=off", "chat completions"),
                     ("a=openai:m@http://h/v1,usd_per_1m_in=1", "both"),
                     ("a=openai:m@http://h/v1,usd_per_1m_in=x,usd_per_1m_out=1", "a number"),
                     ("a=DIR,usd_per_1m_in=1", "unknown option")):
        with pytest.raises(LmforgeError, match=msg):
            parse_variant(bad)


def test_api_price_from_the_table_by_model_name():
    from lmforge.eval.compare import api_price
    from lmforge.plan.prices import load_prices

    table = load_prices()
    for name in ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", "GPT-4o-mini"):
        price, basis = api_price(parse_variant(f"a=openai:{name}@http://127.0.0.1:1/v1"), table)
        assert (price.input_usd_per_1m, price.output_usd_per_1m) == (0.15, 0.60) and "gpt-4o-mini" in basis
    price, basis = api_price(parse_variant("a=openai:my-model@http://127.0.0.1:1/v1"), table)
    assert price is None and basis.startswith("unpriced") and "--prices" in basis
    price, _ = api_price(parse_variant("a=openai:my-model@http://127.0.0.1:1/v1,usd_per_1m_in=1,usd_per_1m_out=2"),
                         table)
    assert (price.input_usd_per_1m, price.output_usd_per_1m) == (1.0, 2.0)


def test_cost_uses_plan_formula():
    from lmforge.plan.cost import throughput_price, usd_per_1k_queries

    s = {"tokens_per_s": 500.0, "prompt_tokens": 80.0, "output_tokens": 20.0}
    assert cost_per_1k(s, 3.0) == pytest.approx(1000 * self_hosted_cost_per_query(500.0, 3.0, 100.0))
    assert cost_per_1k(s, 3.0) == pytest.approx(1000 * 3.0 / 3600 * 100 / 500)
    assert cost_per_1k(s, 3.0) == usd_per_1k_queries(throughput_price(500.0, 3.0), 80.0, 20.0)


def test_compare_two_variants_end_to_end(tiny_model, qa_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--task", str(qa_file), "--variant", f"base={tiny_model},chat=off",
            "--variant", f"fewshot={tiny_model},shots=2,chat=off", "--out", str(out), "--max-new-tokens", "3",
            "--usd-per-hour", "2.5", "--timing-passes", "2", "--no-compile"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text()
    assert printed.strip() == md.strip()
    assert "| variant |" in md and "| base " in md and "| fewshot " in md and "$2.5/hour" in md
    assert f"Command: `lmforge compare --task {qa_file}" in md  # the report names the command that made it
    data = json.loads((out / "results.json").read_text())
    rows = {r["variant"]["name"]: r for r in data["variants"]}
    assert set(rows) == {"base", "fewshot"}
    for name, r in rows.items():
        s = r["summary"]
        assert s["n"] == 6 and 0 <= s["ci95"][0] <= s["accuracy"] <= s["ci95"][1] <= 1
        assert r["usd_per_1k"] == pytest.approx(cost_per_1k(s, 2.5))
        preds = [json.loads(line) for line in (out / f"predictions-{name}.jsonl").read_text().splitlines()]
        assert [p["i"] for p in preds] == list(range(6))  # the same items, in order, for every variant
    assert rows["fewshot"]["summary"]["prompt_tokens"] > rows["base"]["summary"]["prompt_tokens"]
    # how each variant was asked, per variant: template, shots and retrieved chunks used, scoring
    assert rows["base"]["prompt"] == {"chat_template": False, "shots": 0, "shots_used": 0.0, "rag": None,
                                      "rag_chunks": 0.0, "scoring": "generation (exact)"}
    assert rows["fewshot"]["prompt"]["shots_used"] == 2.0
    assert rows["base"]["vs_baseline"] is None and rows["fewshot"]["vs_baseline"]["a"] == "base"
    assert data["baseline"] == "base" and [(p["a"], p["b"]) for p in data["paired"]] == [("base", "fewshot")]
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "config.yaml").is_file()


def test_compare_errors(tiny_model, qa_file, tmp_path, capsys):
    assert main(["compare", "--task", str(qa_file)]) == 2
    assert "at least one variant" in capsys.readouterr().err
    assert main(["compare", "--task", str(qa_file), "--variant", f"a={tmp_path}/none"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compare", "--task", str(qa_file), "--variant", f"a={tiny_model}", "--variant", f"a={tiny_model}"]) == 2
    assert "must differ" in capsys.readouterr().err


def _mc_task(path, copies: int):
    """The MC items `copies` times over, each copy's questions numbered (distinct prompts, same difficulty)."""
    path.write_text("".join(json.dumps({"question": f"{q} ({k})", "choices": c, "answer": i}) + "\n"
                            for k in range(copies) for q, c, i in MC))
    return path


def test_identical_models_get_identical_speed_and_cost(tiny_model, tmp_path, capsys):
    """Two copies of one model directory as two variants: the same accuracy (p = 1), the same machine time and
    cost within eval.timing.CPU_TOLERANCE and the same wall-clock figures within WALL_TOLERANCE. The protocol's
    record must show it was followed: every pass at the fixed thread count over the same items, a warm-up before
    the timed passes, the load average beside the figures."""
    from lmforge.eval.timing import CPU_TOLERANCE, WALL_TOLERANCE, agreement

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    task = _mc_task(tmp_path / "mc.jsonl", 8)  # 40 items
    out = tmp_path / "cmp"
    assert main(["compare", "--task", str(task), "--variant", f"a={tiny_model}", "--variant", f"b={copy}",
                 "--timing-items", "40", "--timing-passes", "7", "--threads", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    data = json.loads((out / "results.json").read_text())
    t = data["timing"]
    assert (t["threads"], t["passes"], t["warmup"], t["items"], t["chunk"]) == (1, 7, 1, 40, 1)
    assert len(t["loadavg_before"]) == 3 and len(t["loadavg_after"]) == 3
    a, b = (r for r in data["variants"])
    for r in (a, b):
        assert r["timing"]["threads"] == [1] and [p["threads"] for p in r["timing"]["passes"]] == [1] * 7
        assert [p["queries"] for p in r["timing"]["passes"]] == [40] * 7
    assert a["summary"]["accuracy"] == b["summary"]["accuracy"]
    assert b["vs_baseline"]["p_value"] == 1.0 and not b["vs_baseline"]["significant"]
    # the same tokens on the same items, so the figures agree as far as the machine lets them
    assert [p["tokens"] for p in a["timing"]["passes"]] == [p["tokens"] for p in b["timing"]["passes"]]
    ta, tb = a["timing"], b["timing"]
    for key, tol in (("machine_tokens_per_s", CPU_TOLERANCE), ("machine_s_per_query", CPU_TOLERANCE),
                     ("tokens_per_s", WALL_TOLERANCE), ("latency_s", WALL_TOLERANCE)):
        assert agreement(ta, tb, key) <= tol, f"{key}: {ta[key]:.4g} vs {tb[key]:.4g} (load {t['loadavg_before']})"
    ca, cb = a["usd_per_1k"], b["usd_per_1k"]
    assert abs(ca - cb) / ((ca + cb) / 2) <= CPU_TOLERANCE
    assert a["usd_per_1k_range"][0] <= ca <= a["usd_per_1k_range"][1]
    md = (out / "results.md").read_text()
    assert "1 torch thread(s)" in md and "Load average" in md and f"within {CPU_TOLERANCE:.0%}" in md


def test_significance_is_marked_against_the_baseline(tiny_model, tmp_path, capsys):
    """Plain prompts vs the chat template on the same model score differently on 40 items; --baseline picks the
    reference; the table marks a significant difference with * and the p-value."""
    task = _mc_task(tmp_path / "mc.jsonl", 8)
    out = tmp_path / "cmp"
    assert main(["compare", "--task", str(task), "--variant", f"chat={tiny_model},chat=on",
                 "--variant", f"plain={tiny_model},chat=off", "--variant", f"chat2={tiny_model},chat=on",
                 "--baseline", "plain", "--timing-passes", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    data = json.loads((out / "results.json").read_text())
    rows = {r["variant"]["name"]: r for r in data["variants"]}
    assert data["baseline"] == "plain" and rows["plain"]["vs_baseline"] is None
    chat = rows["chat"]["vs_baseline"]
    assert chat["diff"] == pytest.approx(rows["chat"]["summary"]["accuracy"] - rows["plain"]["summary"]["accuracy"])
    assert len(data["paired"]) == 3  # every pair, for plan
    assert rows["chat2"]["vs_baseline"]["p_value"] == chat["p_value"]
    md = (out / "results.md").read_text()
    assert "| vs plain " in md.splitlines()[md.splitlines().index("## Accuracy") + 2]
    line = next(x for x in md.splitlines() if x.startswith("| chat "))
    assert (" *" in line) == chat["significant"] and f"{chat['p_value']:.3g}" in line
    assert "| yes " in line and "log-likelihood" in line  # template applied; how it was scored
    assert "Not timed" in md and rows["chat"]["usd_per_1k"] is None


def test_baseline_must_be_a_variant(tiny_model, qa_file, capsys):
    assert main(["compare", "--task", str(qa_file), "--variant", f"a={tiny_model}", "--baseline", "zzz"]) == 2
    assert "--baseline 'zzz' is not one of the variants" in capsys.readouterr().err


def test_graded_metric_gets_score_tests(tiny_model, qa_file, tmp_path, capsys):
    """rougel: per-item scores, the mean with its interval, and the paired permutation test in every pair (plan
    reads it, oriented either way)."""
    from lmforge.eval.stats import paired_score_test
    from lmforge.plan.calibrate import paired_test

    out = tmp_path / "cmp"
    assert main(["compare", "--task", str(qa_file), "--metric", "rougel", "--variant", f"base={tiny_model},chat=off",
                 "--variant", f"shots={tiny_model},shots=2,chat=off", "--max-new-tokens", "4", "--timing-passes", "0",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    data = json.loads((out / "results.json").read_text())
    rows = {r["variant"]["name"]: r for r in data["variants"]}
    scores = {n: [json.loads(x)["score"] for x in (out / f"predictions-{n}.jsonl").read_text().splitlines()]
              for n in rows}
    assert rows["base"]["summary"]["mean_score"] == pytest.approx(sum(scores["base"]) / 6)
    pair = data["paired"][0]
    assert pair["score"] == paired_score_test(scores["base"], scores["shots"])
    flipped = paired_test(data["paired"], "shots", "base")["score"]
    assert flipped["diff"] == -pair["score"]["diff"] and flipped["mean_a"] == pair["score"]["mean_b"]
    md = (out / "results.md").read_text()
    assert "| mean rougel " in md and "p (permutation)" in md
