"""The server's edges: scoring prompts with echo, every malformed body a 400, no NaN on the wire, hang-ups,
slow templates off the event loop, Host and Origin checks, the published schema, the tokenizer routes."""

import json
import logging
import shutil
import socket
import threading
import time

import httpx
import pytest
import torch

from lmforge.inference.load import load
from lmforge.serve.app import create_app
from tests.serve.conftest import LiveServer

KEY = {"Authorization": "Bearer sk-test"}


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript's JSON.parse) do."""
    def refuse(name):
        raise ValueError(f"non-finite number {name} in JSON")
    return json.loads(text, parse_constant=refuse)


def full_forward_logprobs(live, ids):
    model = live.app.state.lmforge.models["tiny"].model
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)  # T V


def test_echo_with_logprobs_scores_the_prompt_in_openais_layout(live, client):
    tok = live.app.state.lmforge.models["tiny"].tokenizer
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, logprobs=2, echo=True, temperature=0)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith(prompt) and len(lp.tokens) == len(ids) + r.usage.completion_tokens
    assert lp.tokens[:len(ids)] == [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    ref = full_forward_logprobs(live, ids)
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-4)
        top = lp.top_logprobs[j]
        assert lp.tokens[j] in top and 2 <= len(top) <= 3  # top 2, plus the prompt's own token (OpenAI: k + 1)
        assert max(top.values()) == pytest.approx(float(ref[j - 1].max()), abs=1e-4)
    assert lp.text_offset[:len(ids)] == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(ids))]
    assert lp.text_offset[len(ids)] == len(prompt)
    # the same request streamed: the prompt's scores come in the choice's first chunk
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=2, logprobs=2, echo=True,
                                            temperature=0, stream=True))
    streamed = [x for ch in chunks for x in ch.choices]
    assert "".join(x.text for x in streamed) == c.text
    # the same scores, up to float rounding: the second request may batch with other work or reuse the cached
    # prompt, and a different matmul shape rounds differently (seen: 2e-7 apart with the bench extra installed)
    again = sum((x.logprobs.token_logprobs for x in streamed if x.logprobs), [])
    assert len(again) == len(lp.token_logprobs) and again[0] is None
    assert again[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)


def test_max_tokens_0_scores_token_id_prompts(live):
    ids_a, ids_b = [5, 17, 42, 99, 7], [200, 3, 3]
    for prompt, want in (([ids_a], [ids_a]), (ids_a, [ids_a]), ([ids_a, ids_b], [ids_a, ids_b])):
        r = httpx.post(live.url + "/v1/completions", headers=KEY, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "n": 1})
        assert r.status_code == 200, r.text
        body = strict_json(r.text)
        assert body["usage"]["completion_tokens"] == 0
        assert len(body["choices"]) == len(want)
        for ch, ids in zip(body["choices"], want):
            ref = full_forward_logprobs(live, ids)
            assert ch["finish_reason"] == "length" and len(ch["logprobs"]["tokens"]) == len(ids)
            assert ch["logprobs"]["token_logprobs"][0] is None
            assert ch["logprobs"]["token_logprobs"][1:] == pytest.approx(
                [float(ref[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-4)
    no_echo = httpx.post(live.url + "/v1/completions", headers=KEY,
                         json={"model": "tiny", "prompt": ids_a, "max_tokens": 0})
    assert no_echo.status_code == 400 and no_echo.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("body,code,param", [
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json", None),  # RecursionError in json
    (b'{"model": "tiny", "prompt": "x", "seed": ' + b"7" * 5000 + b"}", "invalid_json", None),  # > 4,300 digits
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "invalid_json", None),
    (b'{"model": "tiny", "prompt": "x", "top_p": Infinity}', "invalid_json", None),
    (b'{"model": "tiny", "prompt": "a\\udc00b"}', "invalid_json", None),  # a lone surrogate
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', "invalid_json", None),
    (b'{"model": "ti\\udc00ny", "prompt": "x"}', "invalid_json", None),  # echoed in a 404, it could not be encoded
    (b'{"model": "tiny", "prompt": "x", "top_k": 9223372036854775808}', "invalid_value", "top_k"),
    (b'{"model": "tiny", "prompt": "x", "n": 1.0}', "invalid_type", "n"),
    (b'{"model": "tiny", "prompt": "x", "temperature": "0.5"}', "invalid_type", "temperature"),
    (b'{"model": "tiny", "prompt": "x", "stream": 1}', "invalid_type", "stream"),
    (b'{"model": "tiny", "prompt": [1, "a"]}', "invalid_type", "prompt"),
    (b'{"model": "tiny", "prompt": [[1], [-1]]}', "invalid_type", "prompt"),
    (b'{"model": "tiny", "prompt": "x", "seed": 18446744073709551616}', "invalid_value", "seed"),
    (b'{"model": "tiny", "prompt": "x", "temperature": 1e400}', "invalid_type", "temperature"),  # inf
])
def test_unparseable_or_mistyped_bodies_are_400s(live, body, code, param):
    r = httpx.post(live.url + "/v1/completions" if b"messages" not in body else live.url + "/v1/chat/completions",
                   content=body, headers=KEY, timeout=30)
    assert r.status_code == 400, r.text
    err = strict_json(r.text)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["param"] == param


NOT_IMPLEMENTED = [  # (route, field, a value that asks for something, a value that asks for nothing)
    ("/v1/completions", "logit_bias", {"5": 100}, {}),
    ("/v1/completions", "best_of", 2, 1),
    ("/v1/completions", "suffix", " end", ""),
    ("/v1/chat/completions", "logit_bias", {"5": -100}, None),
    ("/v1/chat/completions", "functions", [{"name": "f", "parameters": {}}], None),
    ("/v1/chat/completions", "function_call", "auto", None),
    ("/v1/chat/completions", "modalities", ["text", "audio"], ["text"]),
    ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}, None),
    ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}, None),
    ("/v1/chat/completions", "web_search_options", {}, None),
]


@pytest.mark.parametrize("route,field,asks,harmless", NOT_IMPLEMENTED)
def test_fields_that_would_change_the_reply_are_refused_not_ignored(live, route, field, asks, harmless):
    body = {"model": "tiny", "max_tokens": 2, "temperature": 0}
    body.update({"prompt": "The quick"} if route == "/v1/completions" else
                {"messages": [{"role": "user", "content": "Hi"}]})
    r = httpx.post(live.url + route, json={**body, field: asks}, headers=KEY, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["code"] == "invalid_value" and "does not implement" in err["message"]
    assert httpx.post(live.url + route, json={**body, field: harmless}, headers=KEY, timeout=60).status_code == 200


def test_nan_logits_never_reach_the_wire(model_dirs):
    """A model whose weights hold NaN (a broken adapter or checkpoint): logprobs are null, never NaN literals."""
    base, _ = model_dirs
    lm = load(base, name="broken")
    with torch.no_grad():
        lm.model.lm_head.weight[:5].fill_(float("nan"))
        lm.model.lm_head.weight[5:9].fill_(float("inf"))
    server = LiveServer(create_app({"broken": lm})).start()
    try:
        server.wait_ready()
        for body in ({"prompt": "The quick", "max_tokens": 3, "logprobs": 5, "echo": True},
                     {"prompt": "The quick", "max_tokens": 3, "logprobs": 5, "stream": True}):
            r = httpx.post(server.url + "/v1/completions", json={"model": "broken", **body}, timeout=60)
            assert r.status_code == 200
            for part in (r.text.split("data: ")[1:] if body.get("stream") else [r.text]):
                if part.strip() != "[DONE]":
                    strict_json(part)
            assert "NaN" not in r.text and "Infinity" not in r.text
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "broken", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True,
            "top_logprobs": 5})
        assert r.status_code == 200 and strict_json(r.text)["choices"][0]["logprobs"]["content"]
    finally:
        server.stop()


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def counted(url: str, status: str) -> int:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'lmforge_http_requests_total{{endpoint="/v1/completions",status="{status}"}}'):
            return int(line.split()[-1])
    return 0


def test_a_client_hanging_up_mid_upload_is_no_error(live):
    errors = Records()
    logging.getLogger("lmforge").addHandler(errors)
    try:
        before = counted(live.url, "499"), counted(live.url, "500")
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", live.port)) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-test\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"model\": \"tiny\", ")
                time.sleep(0.1)
        deadline = time.time() + 10
        while counted(live.url, "499") < before[0] + 3 and time.time() < deadline:
            time.sleep(0.05)
        assert counted(live.url, "499") == before[0] + 3 and counted(live.url, "500") == before[1]
        assert not errors.records, [r.getMessage() for r in errors.records]
    finally:
        logging.getLogger("lmforge").removeHandler(errors)


def test_a_looping_chat_template_times_out_off_the_event_loop(model_dirs, tmp_path):
    base, _ = model_dirs
    d = tmp_path / "looping"
    shutil.copytree(base, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    server = LiveServer(create_app({"loop": load(d, name="loop")}, prompt_timeout=1.5)).start()
    try:
        server.wait_ready()
        out = {}

        def chat():
            t0 = time.perf_counter()
            out["r"] = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "model": "loop", "messages": [{"role": "user", "content": "hi"}]})
            out["s"] = time.perf_counter() - t0

        t = threading.Thread(target=chat)
        t.start()
        time.sleep(0.3)
        worst = 0.0
        while t.is_alive():  # the event loop answers others while the template runs
            t0 = time.perf_counter()
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.05)
        assert worst < 0.5, worst
        r = out["r"]
        assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_timeout", r.text
        assert 1.4 < out["s"] < 5
        deadline = time.time() + 5  # and the render was interrupted, not left burning a core
        while any(th.name == "lmforge-prompt" for th in threading.enumerate()) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(th.name == "lmforge-prompt" for th in threading.enumerate())
    finally:
        server.stop()


def test_host_and_origin_checks(model_dirs):
    base, _ = model_dirs
    server = LiveServer(create_app({"tiny": load(base, name="tiny")}, allowed_hosts=["lmforge.lan"],
                                   cors_origins=["https://app.example"])).start()
    try:
        server.wait_ready()
        u = server.url + "/v1/completions"
        body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
        # DNS rebinding: a name that is not ours
        r = httpx.post(u, json=body, headers={"Host": "evil.example:8000"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
        for host in (f"127.0.0.1:{server.port}", "localhost:1", "lmforge.lan", "[::1]:8000", "10.1.2.3"):
            assert httpx.post(u, json=body, headers={"Host": host}).status_code == 200, host
        # blind cross-site requests: a form post from another site's page
        r = httpx.post(u, content=json.dumps(body), headers={"Origin": "https://evil.example",
                                                              "Content-Type": "text/plain"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin_refused"
        assert httpx.post(u, json=body, headers={"Origin": "null"}).status_code == 403
        assert httpx.post(u, json=body, headers={"Origin": server.url}).status_code == 200  # the chat page
        ok = httpx.post(u, json=body, headers={"Origin": "https://app.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        pre = httpx.options(u, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                        "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 204 and "POST" in pre.headers["access-control-allow-methods"]
        assert httpx.options(u, headers={"Origin": "https://evil.example",
                                         "Access-Control-Request-Method": "POST"}).status_code == 403
    finally:
        server.stop()


def test_openapi_publishes_the_request_and_response_schemas(live):
    import jsonschema

    doc = httpx.get(live.url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, req, resp in (("/v1/completions", "CompletionRequest", "Completion"),
                            ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletion"),
                            ("/tokenize", "TokenizeRequest", "TokenizeResponse")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + req)
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + resp)
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    props = schemas["CompletionRequest"]["properties"]
    assert props["logprobs"]["anyOf"][0]["maximum"] == 5 and "echo" in props
    assert {"422"}.isdisjoint(doc["paths"]["/v1/completions"]["post"]["responses"])  # our 400s, not FastAPI's

    def valid(instance, name):
        jsonschema.validate(instance, {"$ref": f"#/components/schemas/{name}", "components": doc["components"]})

    valid({"model": "tiny", "prompt": [[1, 2]], "echo": True, "logprobs": 1, "max_tokens": 0}, "CompletionRequest")
    with pytest.raises(jsonschema.ValidationError):
        valid({"model": "tiny", "prompt": "x", "temperature": 3}, "CompletionRequest")
    r = httpx.post(live.url + "/v1/completions", headers=KEY, json={
        "model": "tiny", "prompt": "The", "max_tokens": 2, "logprobs": 1, "echo": True})
    valid(r.json(), "Completion")
    r = httpx.post(live.url + "/v1/chat/completions", headers=KEY, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True})
    valid(r.json(), "ChatCompletion")
    valid(httpx.get(live.url + "/v1/models", headers=KEY).json(), "ModelList")


def test_tokenizer_routes(live):
    tok = live.app.state.lmforge.models["tiny"].tokenizer
    info = httpx.get(live.url + "/tokenizer_info", headers=KEY).json()
    assert info["eos_token"] == tok.eos_token and info["model_max_length"] == 256 and info["chat_template"]
    assert httpx.get(live.url + "/tokenizer_info").status_code == 401  # the key, as on /v1
    r = httpx.post(live.url + "/tokenize", headers=KEY, json={"prompt": "Hello there", "add_special_tokens": False})
    assert r.json()["tokens"] == tok.encode("Hello there", add_special_tokens=False)
    msgs = [{"role": "user", "content": "Hello"}]
    r = httpx.post(live.url + "/tokenize", headers=KEY, json={"model": "tiny-sql", "messages": msgs})
    chat = httpx.post(live.url + "/v1/chat/completions", headers=KEY,
                      json={"model": "tiny", "messages": msgs, "max_tokens": 1}).json()
    assert r.json()["count"] == chat["usage"]["prompt_tokens"]
    ids = r.json()["tokens"]
    assert httpx.post(live.url + "/detokenize", headers=KEY, json={"tokens": ids}).json()["prompt"] == tok.decode(
        ids, skip_special_tokens=False)
    for path, body in (("/detokenize", {"tokens": [10**6]}), ("/tokenize", {}), ("/tokenize", {"model": "nope",
                                                                                               "prompt": "x"})):
        r = httpx.post(live.url + path, headers=KEY, json=body)
        assert r.status_code in (400, 404) and set(r.json()["error"]) == {"message", "type", "param", "code"}
