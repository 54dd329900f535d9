"""API models as compare variants, against a real `lmforge serve` on a loopback port (nothing else is called):
the same items, answers equal to the local model's, usage tokens, prices or "unpriced", multiple choice scored
by the letter the reply names, and the errors a user meets (no key, a refused key, nothing listening)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmforge.cli import main
from lmforge.eval.api import choice_question, parse_choice
from lmforge.plan.cost import TokenPrice, usd_per_1k_queries

KEY = "sk-compare-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model):
    """`lmforge serve --model tiny=DIR` in its own process on 127.0.0.1, with an API key."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", f"tiny={tiny_model}",
                             "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY, "--threads", "1",
                             "--max-batch", "2", "--log-level", "warning"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"lmforge serve did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    yield url + "/v1"
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _rows(out):
    data = json.loads((out / "results.json").read_text())
    return data, {r["variant"]["name"]: r for r in data["variants"]}


def test_api_variant_answers_as_the_local_model_does(served, tiny_model, qa_file, tmp_path, monkeypatch, capsys):
    """Greedy through the server equals greedy in-process on the same chat turns: same replies, same prompt
    tokens (the server's usage), scored by the same metric. A model missing from the price table is unpriced;
    one priced on the variant costs usd_per_1k_queries of the tokens the endpoint reported."""
    monkeypatch.setenv("LMF_TEST_KEY", KEY)
    out = tmp_path / "cmp"
    assert main(["compare", "--task", str(qa_file), "--variant", f"local={tiny_model},chat=on",
                 "--variant", f"api=openai:tiny@{served}", "--variant", f"priced=openai:tiny@{served},"
                 "usd_per_1m_in=0.5,usd_per_1m_out=2", "--api-key-env", "LMF_TEST_KEY", "--max-new-tokens", "6",
                 "--timing-passes", "1", "--timing-items", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    data, rows = _rows(out)
    local = [json.loads(x) for x in (out / "predictions-local.jsonl").read_text().splitlines()]
    api = [json.loads(x) for x in (out / "predictions-api.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in api] == [r["prediction"] for r in local]
    assert [r["prompt_tokens"] for r in api] == [r["prompt_tokens"] for r in local]
    assert all(r["output_tokens"] >= 1 for r in api)
    assert rows["api"]["summary"]["accuracy"] == rows["local"]["summary"]["accuracy"]
    assert rows["api"]["prompt"]["chat_template"] == "endpoint's" and rows["api"]["timing"] is None
    assert rows["api"]["usd_per_1k"] is None and rows["api"]["cost_basis"].startswith("unpriced")
    s = rows["priced"]["summary"]
    assert rows["priced"]["usd_per_1k"] == pytest.approx(
        usd_per_1k_queries(TokenPrice(0.5, 2.0), s["prompt_tokens"], s["output_tokens"]))
    md = (out / "results.md").read_text()
    assert "unpriced" in md and "endpoint's" in md and "generation (exact)" in md
    # the API variant is paired with the others on the same items
    assert {(p["a"], p["b"]) for p in data["paired"]} == {("local", "api"), ("local", "priced"), ("api", "priced")}


def test_multiple_choice_through_an_api_is_scored_by_generation(served, mc_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "cmp"
    assert main(["compare", "--task", str(mc_file), "--variant", f"api=openai:tiny@{served},shots=1",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    _, rows = _rows(out)
    assert rows["api"]["prompt"]["scoring"] == "generation (answer letter)"
    assert rows["api"]["prompt"]["shots_used"] == 1.0
    recs = [json.loads(x) for x in (out / "predictions-api.jsonl").read_text().splitlines()]
    assert len(recs) == 5 and all("parsed" in r and "reply" in r for r in recs)
    # the question went out lettered, after one shot answered by its letter
    msgs = recs[0]["prompt"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"] and len(msgs[1]["content"]) == 1
    assert "A. water" in msgs[-1]["content"] and "letter" in msgs[-1]["content"]
    for r in recs:  # a reply that names no single choice counts as wrong
        assert r["correct"] == (r["parsed"] and r["prediction"] == r["answer"])
    md = (out / "results.md").read_text()
    assert "generation (answer letter)" in md and "Multiple choice through an API is scored by generation" in md


def test_api_errors_say_what_to_do(served, qa_file, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    base = ["compare", "--task", str(qa_file), "--timing-passes", "0", "--out", str(tmp_path / "o")]
    assert main(base + ["--variant", f"api=openai:tiny@{served}", "--api-key-env", "NOPE_KEY"]) == 2
    assert "NOPE_KEY: that environment variable is not set" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    assert main(base + ["--variant", f"api=openai:tiny@{served}"]) == 2
    assert "refused the API key" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert main(base + ["--variant", f"api=openai:no-such-model@{served}"]) == 2
    assert "404" in capsys.readouterr().err
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    assert main(base + ["--variant", f"api=openai:tiny@{dead}"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert main(base + ["--variant", "api=openai:tiny@ftp://127.0.0.1/v1"]) == 2
    assert "http:// or https://" in capsys.readouterr().err


@pytest.mark.parametrize("reply,expected", [
    ("B", 1), ("b", 1), ("(C)", 2), ("C.", 2), ("Answer: A", 0), ("The answer is B", 1), ("C) sand", 2),
    ("B petrol", 1), ("petrol", 1), ("Sand.", 2), ("It is petrol, not sand", None), ("D", None), ("", None),
    ("A cow drinks water", 0),  # not the letter A: the choice text "water"
    ("A cow drinks petrol", 1),
])
def test_parse_choice(reply, expected):
    assert parse_choice(reply, ["water", "petrol", "sand"]) == expected


def test_choice_question_letters_the_choices():
    q = choice_question("What do cows drink?", ["water", "petrol"])
    assert q.splitlines()[:4] == ["What do cows drink?", "", "A. water", "B. petrol"]
