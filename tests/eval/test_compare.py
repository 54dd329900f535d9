"""`lmforge compare` end to end on a tiny model: two variants, the table, the JSON, the chart; variant parsing."""

import json

import pytest

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.compare import cost_per_1k, parse_variant
from lmforge.plan.cost import self_hosted_cost_per_query


def test_parse_variant():
    v = parse_variant("rag=runs/x/final,rag=indexes/docs,shots=2,top_k=4,chat=off")
    assert (v.name, v.model, v.rag, v.shots, v.top_k, v.chat) == ("rag", "runs/x/final", "indexes/docs", 2, 4, "off")
    assert parse_variant("base=DIR").shots == 0
    for bad, msg in (("justadir", "NAME=MODEL_DIR"), ("a=b,shots=x", "integer"), ("a=b,temp=1", "unknown option"),
                     ("a=b,chat=maybe", "auto, on or off")):
        with pytest.raises(LmforgeError, match=msg):
            parse_variant(bad)


def test_cost_uses_plan_formula():
    s = {"tokens_per_s": 500.0, "prompt_tokens": 80.0, "output_tokens": 20.0}
    assert cost_per_1k(s, 3.0) == pytest.approx(1000 * self_hosted_cost_per_query(500.0, 3.0, 100.0))
    assert cost_per_1k(s, 3.0) == pytest.approx(1000 * 3.0 / 3600 * 100 / 500)


def test_compare_two_variants_end_to_end(tiny_model, qa_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--task", str(qa_file), "--variant", f"base={tiny_model},chat=off",
            "--variant", f"fewshot={tiny_model},shots=2,chat=off", "--out", str(out), "--max-new-tokens", "3",
            "--usd-per-hour", "2.5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text()
    assert printed.strip() == md.strip()
    assert "| variant |" in md and "| base " in md and "| fewshot " in md and "$2.5/hour" in md
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
