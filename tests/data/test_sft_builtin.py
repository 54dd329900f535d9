"""The built-in sets from the installed stdlib: deterministic, split by subject, in the shapes eval reads."""

import json

from lmforge.data import builtin_sets as b
from lmforge.data.sft import to_messages


def test_builtin_sets(tmp_path):
    facts = b.stdlib_facts()
    assert len(facts) > 500 and {f.kind for f in facts} == {"function", "signature", "class", "module"}
    train, held = b.split_facts("train"), b.split_facts("heldout")
    assert not {f.subject for f in train} & {f.subject for f in held}
    assert 0.05 < len(held) / len(facts) < 0.15
    # real stdlib knowledge: the answer comes from the docstring or the signature
    by_subject = {(f.kind, f.subject): f for f in facts}
    sig = by_subject.get(("signature", "textwrap.fill"))
    assert sig is None or sig.answer.startswith("fill(text, width=70")
    paths = b.write_builtin_sets(tmp_path)
    again = b.write_builtin_sets(tmp_path / "again")
    for name, p in paths.items():
        assert p.read_bytes() == again[name].read_bytes()  # deterministic
    sft = [json.loads(x) for x in paths["sft-train"].read_text().splitlines()]
    assert to_messages(sft[0])[1]["role"] == "assistant" and len(sft) == len(train)
    qa = [json.loads(x) for x in paths["heldout-qa"].read_text().splitlines()]
    assert set(qa[0]) == {"prompt", "answer"} and len(qa) == len(held)
    mc = [json.loads(x) for x in paths["heldout-mc"].read_text().splitlines()]
    assert all(len(m["choices"]) == 4 and len(set(m["choices"])) == 4 for m in mc)
    answers = {(f.question, f.answer) for f in held}
    assert all((m["question"], m["choices"][m["answer"]]) in answers for m in mc)
    assert {m["question"].split()[1] for m in mc} >= {"does", "are"}  # docstring and signature questions
    pref = [json.loads(x) for x in paths["pref-train"].read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] for p in pref)


def test_heldout_files_ask_the_same_questions_in_the_same_order():
    qa, mc = b.heldout_qa(), b.heldout_mc()
    assert [q["prompt"] for q in qa[:len(mc)]] == [m["question"] for m in mc]
    assert all(q["answer"] == m["choices"][m["answer"]] for q, m in zip(qa, mc))
    assert len({m["question"].split("`")[0] for m in mc[:40]}) >= 3  # the first items mix the kinds


def test_stdlib_docs_hold_the_answers(tmp_path, capsys):
    from lmforge.cli import main

    pages = dict(b.stdlib_docs())
    page = pages["textwrap"]
    assert page.startswith("# Module `textwrap`") and "## function `textwrap.dedent(text)`" in page
    assert "Remove any common leading whitespace from every line in `text`." in page
    # the reference covers held-out subjects too: what retrieval is for
    text = "\n".join(pages.values())
    mc = b.heldout_mc()[:50]
    assert sum(m["choices"][m["answer"]] in text for m in mc) >= 45
    assert main(["data", "builtin", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "docs" / "textwrap.md").read_text() == page
    assert (tmp_path / "d" / "heldout-mc.jsonl").is_file() and "reference pages" in capsys.readouterr().err
