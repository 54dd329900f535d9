"""The server as users meet it: the official openai client (and raw HTTP) against a live loopback server."""

import json
import threading
import time

import httpx
import openai
import pytest

from lmforge.cli import main
from lmforge.inference.engine import Engine
from lmforge.inference.generate import chat_ids
from lmforge.inference.load import load
from lmforge.inference.sampling import SamplingParams

KEY = {"Authorization": "Bearer sk-test"}
GREEDY = dict(temperature=0, seed=0)


def test_models_health_and_page(live, client):
    assert sorted(m.id for m in client.models.list().data) == ["tiny", "tiny-sql"]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"  # no key needed
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_chat_non_streaming_and_streaming_agree(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, **GREEDY)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 5 and 0 < full.usage.completion_tokens <= 20
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, stream=True, **GREEDY))
    assert all(c.choices for c in plain)  # without include_usage there is no usage chunk


def test_completion_n2_stop_and_logprobs(client):
    base = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=16, **GREEDY)
    text = base.choices[0].text
    assert base.object == "text_completion" and base.usage.completion_tokens <= 16
    two = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=16, n=2, temperature=1.0,
                                    seed=5)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.prompt_tokens == base.usage.prompt_tokens
    again = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=16, n=2, temperature=1.0,
                                      seed=5)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]  # seeded: reproducible
    # a stop string inside the greedy text cuts the reply just before it
    assert len(text) >= 4
    stop = text[2:4]
    cut = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=16, stop=[stop], **GREEDY)
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    lp = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=3, logprobs=2, **GREEDY)
    assert len(lp.choices[0].logprobs.token_logprobs) == lp.usage.completion_tokens
    assert all(v <= 0 for v in lp.choices[0].logprobs.token_logprobs)
    streamed = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=16, stream=True, n=2,
                                         **GREEDY)
    parts = {0: "", 1: ""}
    for c in streamed:
        for ch in c.choices:
            parts[ch.index] += ch.text
    assert parts[0] == text and parts[1] == text  # same seed+greedy: both choices greedy


def test_adapter_is_its_own_model(client, model_dirs, tmp_path):
    msgs = [{"role": "user", "content": "Hello"}]
    a = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, **GREEDY)
    b = client.chat.completions.create(model="tiny-sql", messages=msgs, max_tokens=12, **GREEDY)
    assert a.choices[0].message.content != b.choices[0].message.content
    # the served adapter answers exactly as the model `lmforge merge` makes of it (adapter folded into the base)
    _, adapter = model_dirs
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = load(tmp_path / "merged")
    ids = chat_ids(merged.tokenizer, msgs)
    out = Engine(merged.model, eos_ids=merged.eos_ids).generate([ids], SamplingParams(temperature=0.0,
                                                                                      max_tokens=12))[0]
    assert b.choices[0].message.content == merged.tokenizer.decode([i for i in out if i not in merged.eos_ids])
    assert b.usage.prompt_tokens == len(ids) and b.usage.completion_tokens == len(out)


def test_errors_have_openai_shape(live, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="word " * 400)
    assert e.value.body["code"] == "context_length_exceeded" and "256" in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    url = live.url + "/v1/chat/completions"
    cases = [
        (httpx.post(url, content=b"{not json", headers=KEY), 400, "invalid_json"),
        (httpx.post(url, json={"model": "tiny"}, headers=KEY), 400, "missing_required_parameter"),
        (httpx.post(url, json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]}), 401,
         "missing_api_key"),
        (httpx.post(url, content=b"x" * 3_000_000, headers=KEY), 413, "request_too_large"),
        (httpx.post(url, json={"model": "tiny", "messages": [], "n": 1}, headers=KEY), 400, "invalid_value"),
        (httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0},
                    headers=KEY), 400, "invalid_value"),
        (httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": [99999]}, headers=KEY), 400, None),
        (httpx.get(live.url + "/v1/nothing", headers=KEY), 404, None),
    ]
    for r, status, code in cases:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert code is None or err["code"] == code, err


def test_disconnect_mid_stream_frees_the_slot(live):
    engine = live.app.state.lmforge.engines["tiny"]
    before = engine.stats.generation_tokens_total
    body = {"model": "tiny", "prompt": "The", "max_tokens": 200, "stream": True, "ignore_eos": True, **GREEDY}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, headers=KEY) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += 1
                if got == 3:
                    break
    deadline = time.time() + 10
    while engine.queue_stats()["running"] and time.time() < deadline:
        time.sleep(0.02)
    assert engine.queue_stats()["running"] == 0
    assert engine.stats.generation_tokens_total - before < 150  # cancelled, not run on to max_tokens


def test_many_concurrent_clients_all_complete(live, client):
    results, errors = [], []

    def one(i):
        try:
            r = client.chat.completions.create(model="tiny" if i % 3 else "tiny-sql", max_tokens=8,
                                               messages=[{"role": "user", "content": f"request {i}"}], **GREEDY)
            results.append(r.choices[0].finish_reason)
        except Exception as e:  # pragma: no cover - shown by the assert
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 24
    metrics = httpx.get(live.url + "/metrics").text
    assert 'lmforge_running_requests{model="tiny"}' in metrics
    assert 'lmforge_compiling{model="tiny"} 0' in metrics  # the suite serves eagerly: nothing compiles
    assert "lmforge_time_to_first_token_seconds_bucket" in metrics
    assert json.dumps(metrics)  # plain text
