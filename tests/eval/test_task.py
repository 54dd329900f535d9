"""Task accuracy: file checks, few-shot draws, metrics, choice log-likelihoods and greedy generations against a
direct computation on a tiny random model, RAG prompts."""

import json

import pytest
import torch

from lmforge.checkpoint import load_model, load_tokenizer
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.lm import EvalModel
from lmforge.eval.task import (
    TaskConfig,
    evaluate,
    load_examples,
    normalize,
    rouge_l,
    score_generation,
    shot_indices,
    token_f1,
)
from tests.eval.conftest import MC, QA


@pytest.fixture(scope="module")
def em(tiny_model):
    return EvalModel(tiny_model)


def test_load_examples_checks_the_file(tmp_path, qa_file, mc_file):
    qa = load_examples(qa_file)
    assert [(e.prompt, e.answer) for e in qa] == QA
    mc = load_examples(mc_file)
    assert mc[1].choices == ["brick", "apple", "cloud"] and mc[1].answer_index == 1 and mc[1].answer == "apple"
    bad = {
        "x.jsonl": ("{not json}\n", "not valid JSON"),
        "y.jsonl": ('{"prompt": "q"}\n', "string \"prompt\" and \"answer\""),
        "z.jsonl": ('{"question": "q", "choices": ["a", "b"], "answer": 2}\n', "index of the right choice"),
        "w.jsonl": ('{"question": "q", "choices": ["a"], "answer": 0}\n', "2 or more"),
        "v.jsonl": ('{"prompt": "q", "answer": "a"}\n{"question": "q", "choices": ["a", "b"], "answer": 0}\n', "mixes"),
        "u.jsonl": ("\n", "no examples"),
    }
    for name, (text, msg) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(LmforgeError, match=msg):
            load_examples(tmp_path / name)
    (tmp_path / "s.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": "b"}\n')
    assert load_examples(tmp_path / "s.jsonl")[0].answer_index == 1  # the answer may be the choice's text


def test_shots_never_include_the_item_and_are_stable():
    for i in range(6):
        s = shot_indices(6, i, 3, seed=0)
        assert len(set(s)) == 3 and i not in s
        assert s == shot_indices(6, i, 3, seed=0)
    assert shot_indices(6, 0, 3, seed=0) != shot_indices(6, 0, 3, seed=1) or shot_indices(6, 1, 3, 0) != shot_indices(6, 1, 3, 1)
    with pytest.raises(LmforgeError, match="at least 6 items"):
        shot_indices(5, 0, 5, 0)


def test_metrics():
    assert normalize('  "Paris."  ') == "paris"
    assert score_generation("paris", "Paris", "exact") and not score_generation("Paris, France", "Paris", "exact")
    assert score_generation("It is  PARIS, France", "paris", "contains")
    assert not score_generation("", "", "contains")


@pytest.mark.parametrize("pred,ref", [
    ("Remove any common leading whitespace from every line in text.", "Remove common leading whitespace."),
    ("the cat sat on the mat", "the cat is on the mat"), ("Return a new list", "return the sorted list of items"),
    ("nothing in common", "at all here"), ("A b c d", "d c b a"), ("x", "x")])
def test_rouge_l_equals_rouge_score(pred, ref):
    """ROUGE-L F against Google's rouge-score package (no stemming) where it is installed."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    want = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert rouge_l(pred, ref) == pytest.approx(want, abs=1e-12)


def test_graded_metrics_known_values():
    # LCS("the cat sat", "the cat ran fast") = 2: P = 2/3, R = 2/4, F = 4/7
    assert rouge_l("The cat sat.", "the cat ran fast") == pytest.approx(4 / 7)
    assert rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0
    # SQuAD F1: articles and punctuation dropped, multiset overlap {cat, sat} of 3 predicted and 2 reference words
    assert token_f1("The cat sat down!", "a cat sat") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("b b", "b") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert score_generation("Remove common leading whitespace.", "remove common leading whitespace from text", "rougel")
    assert not score_generation("Set a mocks to the mock.", "Remove common leading whitespace.", "rougel")


@torch.no_grad()
def test_choice_logprobs_equal_a_direct_forward(em, tiny_model, mc_file):
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    result = evaluate(TaskConfig(model=str(tiny_model), data=str(mc_file), chat="off"), em=em)
    assert result["summary"]["metric"] == "choice" and result["summary"]["n"] == len(MC)
    for rec, (q, choices, ans) in zip(result["records"], MC):
        ctx = tok.encode(f"Question: {q}\nAnswer:")  # prompts are encoded as `lmforge generate` does
        direct = []
        for c in choices:
            cont = tok.encode(" " + c)
            logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0].float(), -1)
            direct.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
        assert rec["logprobs"] == pytest.approx(direct, abs=1e-3)
        best = max(range(len(choices)), key=lambda j: direct[j])
        assert rec["correct"] == (best == ans)
        best_norm = max(range(len(choices)), key=lambda j: direct[j] / len(choices[j]))
        assert rec["correct_norm"] == (best_norm == ans)
    s = result["summary"]
    assert s["accuracy"] == sum(r["correct"] for r in result["records"]) / len(MC)
    assert s["output_tokens"] == 0 and s["latency_s"] > 0
    # chat format: each choice is the assistant's reply, end-of-turn included
    chat = evaluate(TaskConfig(model=str(tiny_model), data=str(mc_file), chat="on", limit=1), em=em)
    q, choices, _ = MC[0]
    msgs = [{"role": "user", "content": q}]
    ctx = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
    direct = []
    for c in choices:
        cont = tok.encode(c + "<|im_end|>")
        logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0].float(), -1)
        direct.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    assert chat["records"][0]["logprobs"] == pytest.approx(direct, abs=1e-3)


@torch.no_grad()
def _greedy(model, tok, prompt_ids, n, stop_ids):
    """Greedy decoding by full forwards (no cache, no engine)."""
    ids = list(prompt_ids)
    out = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop_ids:
            break
    return tok.decode([t for t in out if t not in stop_ids])


def test_generation_accuracy_against_direct_greedy(em, tiny_model, tmp_path):
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    # gold answers = the model's own greedy continuations (cut at the first newline, as plain prompts are):
    # then exact match must score every item right, and a wrong answer must score it wrong
    rows = []
    for i, (q, _) in enumerate(QA[:4]):
        text = _greedy(model, tok, tok.encode(q), 6, set(em.stop_ids)).split("\n")[0].strip()
        rows.append({"prompt": q, "answer": text if i % 2 == 0 else text + " wrong"})
    assert all(r["answer"].strip() for r in rows)
    f = tmp_path / "self.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = evaluate(TaskConfig(model=str(tiny_model), data=str(f), chat="off", max_new_tokens=6), em=em)
    assert [r["correct"] for r in out["records"]] == [True, False, True, False]
    assert [r["prediction"] for r in out["records"]][::2] == [r["answer"] for r in rows][::2]
    s = out["summary"]
    assert s["accuracy"] == 0.5 and s["ci95"][0] < 0.5 < s["ci95"][1]
    assert all(1 <= r["output_tokens"] <= 6 for r in out["records"])
    assert s["prompt_tokens"] == sum(len(tok.encode(r["prompt"])) for r in rows) / 4

    # graded: each item's score is ROUGE-L of its prediction, correct from 0.5 on, the mean with an interval
    out = evaluate(TaskConfig(model=str(tiny_model), data=str(f), chat="off", max_new_tokens=6, metric="rougel"),
                   em=em)
    scores = [rouge_l(r["prediction"], r["answer"]) for r in out["records"]]
    assert [r["score"] for r in out["records"]] == scores and scores[0] == 1.0
    assert [r["correct"] for r in out["records"]] == [x >= 0.5 for x in scores]
    s = out["summary"]
    assert s["mean_score"] == pytest.approx(sum(scores) / 4)
    assert s["score_ci95"][0] <= s["mean_score"] <= s["score_ci95"][1]


def test_few_shot_and_chat_prompts(em, tiny_model, qa_file):
    plain = evaluate(TaskConfig(model=str(tiny_model), data=str(qa_file), shots=2, chat="off", max_new_tokens=2,
                                limit=3), em=em)
    for rec in plain["records"]:
        blocks = rec["prompt"].split("\n\n")
        assert len(blocks) == 3 and rec["shots"] == 2
        assert blocks[-1] == QA[rec["i"]][0]  # the item itself comes last ...
        assert all(b != f"{QA[rec['i']][0]} {QA[rec['i']][1]}" for b in blocks[:2])  # ... and is never a shot
        assert all(any(b == f"{q} {a}" for q, a in QA) for b in blocks[:2])
    chat = evaluate(TaskConfig(model=str(tiny_model), data=str(qa_file), shots=1, chat="on", max_new_tokens=2,
                               limit=2), em=em)
    p = chat["records"][0]["prompt"]
    assert p.count("<|im_start|>user") == 2 and p.count("<|im_start|>assistant") == 2
    assert p.endswith("<|im_start|>assistant\n")


def test_shots_dropped_to_fit_the_context(tmp_path):
    from tests.eval.conftest import make_tiny_model

    small = make_tiny_model(tmp_path / "m", max_seq_len=40)
    rows = [{"prompt": f"Question number {i} asks about something long enough", "answer": "x"} for i in range(4)]
    f = tmp_path / "long.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = evaluate(TaskConfig(model=str(small), data=str(f), shots=3, chat="off", max_new_tokens=4, compile=False))
    assert all(r["shots"] < 3 for r in out["records"])
    with pytest.raises(LmforgeError, match="does not fit"):
        evaluate(TaskConfig(model=str(small), data=str(f), chat="off", max_new_tokens=39))


def test_rag_puts_sources_in_the_prompt(em, tiny_model, tmp_path, monkeypatch):
    from lmforge.rag.index import Index, find_documents
    from tests.rag.shared import embedder, write_docs

    monkeypatch.chdir(tmp_path)
    write_docs(tmp_path / "docs")
    index = Index.create(tmp_path / "idx", embedder())
    index.add_documents(find_documents(["docs"]))
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"prompt": "Which rocket carried astronauts to the Moon?", "answer": "Saturn V"}) + "\n")
    out = evaluate(TaskConfig(model=str(tiny_model), data=str(f), rag="idx", top_k=2, chat="off", max_new_tokens=3),
                   em=em, index=index)
    rec = out["records"][0]
    assert rec["sources"][0]["source"] == "docs/rockets.txt" and 1 <= len(rec["sources"]) <= 2
    assert "[1] docs/rockets.txt" in rec["prompt"] and rec["prompt"].endswith("Which rocket carried astronauts to the Moon?")
    assert 40 < rec["prompt_tokens"] <= 256 - 3  # within the context left after the answer's tokens


def test_cli_table_json_and_errors(tiny_model, mc_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "task", "--model", str(tiny_model), "--data", str(mc_file), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "95% CI (Wilson)" in text and "length-normalised" in text
    saved = json.loads(out.read_text())
    assert len(saved["records"]) == len(MC) and saved["summary"]["metric"] == "choice"
    assert main(["eval", "task", "--model", str(tiny_model), "--data", str(mc_file), "--json", "--length-norm"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["headline"] == "accuracy_norm" and s["accuracy"] == s["accuracy_norm"]
    assert main(["eval", "task", "--model", str(tiny_model), "--data", str(mc_file), "--metric", "exact"]) == 2
    assert "--metric choice" in capsys.readouterr().err
    assert main(["eval", "task", "--model", str(tmp_path / "nope"), "--data", str(mc_file)]) == 2
    assert "does not exist" in capsys.readouterr().err
