"""Constrained decoding in the engine, and the tool-call formats: grammars refuse what they cannot enforce,
masks hold in a mixed batch without touching unconstrained rows, each family's calls parse and its grammar
accepts exactly what its parser reads."""

import json

import pytest

from lmforge.inference.constrain import GrammarError, Vocabulary, close_objects
from lmforge.inference.engine import Engine
from lmforge.inference.sampling import SamplingParams
from lmforge.inference.tools import (
    FORMATS,
    MAX_PARALLEL_CALLS,
    ToolStream,
    call_grammar,
    detect_format,
    prepare_messages,
)
from tests.inference.tiny import make_model_dir

pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from lmforge.inference.load import load

    return load(make_model_dir(tmp_path_factory.mktemp("constrain") / "tiny"))


@pytest.fixture(scope="module")
def vocab(lm):
    return Vocabulary(lm.tokenizer, lm.model.cfg.vocab_size, lm.eos_ids)


def test_grammar_errors_name_the_keyword(vocab):
    for schema, keyword in [({"type": "array", "uniqueItems": True}, "uniqueItems"),
                            ({"if": {}, "then": {}}, "if"), ({"type": "string", "format": "nope"}, "format")]:
        with pytest.raises(GrammarError) as e:
            vocab.json_schema(schema)
        assert e.value.keyword == keyword and keyword in str(e.value)
    for bad in (lambda: vocab.regex("a(b"), lambda: vocab.lark("start: ("), lambda: vocab.choice([]),
                lambda: vocab.json_schema([1])):
        with pytest.raises(GrammarError):
            bad()


def test_json_layout_and_closed_objects(vocab):
    g = vocab.json_schema({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array"}}})
    assert g.accepts('{"a": 1, "b": [1, 2]}') and g.accepts("{}")
    assert not g.accepts('{"a":1}') and not g.accepts('{ "a": 1 }')  # json.dumps' layout only
    assert not g.accepts('{"a": 1, "c": 2}')  # properties listed, nothing said of others: closed
    assert vocab.json_schema({"type": "object", "properties": {"a": {}}, "additionalProperties": True}) \
        .accepts('{"a": 1, "c": 2}')
    nested = close_objects({"properties": {"properties": {"type": "object", "properties": {"x": {}}}},
                            "$defs": {"d": {"properties": {}}}, "anyOf": [{"properties": {}}]})
    assert nested["additionalProperties"] is False
    assert nested["properties"]["properties"]["additionalProperties"] is False
    assert nested["$defs"]["d"]["additionalProperties"] is False and nested["anyOf"][0]["additionalProperties"] \
        is False


def test_masked_batch_leaves_free_rows_alone_and_ends_at_the_grammar(lm, vocab):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "ok": {"type": "boolean"}}, "required": ["n", "ok"]}
    g = vocab.json_schema(schema)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eng = Engine(lm.model, max_batch=4, eos_ids=lm.eos_ids)
    alone = eng.generate(prompts, free)
    mixed = eng.generate(prompts + [[5, 6, 7]], [free] * 3 + [free.replace(max_tokens=60, grammar=g)])
    assert mixed[:3] == alone  # the constrained neighbour changes nothing for the free rows
    text = lm.tokenizer.decode(mixed[3])
    assert json.loads(text)["ok"] in (True, False) and 0 <= json.loads(text)["n"] <= 999
    assert len(mixed[3]) < 60  # ended by the grammar, not by max_tokens
    sampled = eng.generate([[5, 6]] * 3, [SamplingParams(temperature=1.5, top_k=50, repetition_penalty=1.3,
                                                         seed=s, max_tokens=60, grammar=g) for s in range(3)])
    for ids in sampled:
        json.loads(lm.tokenizer.decode(ids))
    choice = vocab.choice(["yes", "no"])
    out = eng.generate([[1, 2]], SamplingParams(temperature=1.0, seed=0, max_tokens=20, grammar=choice))[0]
    assert lm.tokenizer.decode(out) in ("yes", "no")


HERMES_TEMPLATE_CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
FUNCS = [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                                       "required": ["x"]}},
         {"name": "g", "parameters": {"type": "object", "properties": {"s": {"enum": ["a", "b"]}}}}]


def test_formats_parse_their_calls_and_text():
    hermes, llama3, mistral = FORMATS["hermes"], FORMATS["llama3"], FORMATS["mistral"]
    content, calls = hermes.parse("Let me check.\n" + HERMES_TEMPLATE_CALL + "\n" +
                                  '<tool_call>\n{"name": "g", "arguments": {"s":"a"}}\n</tool_call>')
    assert content == "Let me check." and [(c.name, c.arguments) for c in calls] == \
        [("f", '{"x": 1}'), ("g", '{"s": "a"}')]
    assert hermes.parse("<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", [])
    assert hermes.parse("no calls") == ("no calls", [])
    _, calls = llama3.parse('<|python_tag|>{"name": "f", "parameters": {"x": 2}}; {"name": "g", "parameters": {}}')
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"x": 2}'), ("g", "{}")]
    assert llama3.parse("The answer is {x}") == ("The answer is {x}", [])
    _, calls = mistral.parse('[TOOL_CALLS] [{"name": "f", "arguments": {"x": 3}}]')
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"x": 3}')]
    _, calls = mistral.parse('[{"name": "g", "arguments": "{\\"s\\": \\"b\\"}"}]')  # opener skipped as special
    assert calls[0].arguments == '{"s": "b"}'


def test_grammars_accept_what_the_parsers_read(vocab):
    cases = {"hermes": (HERMES_TEMPLATE_CALL, HERMES_TEMPLATE_CALL + "\n" + HERMES_TEMPLATE_CALL),
             "llama3": ('{"name": "f", "parameters": {"x": 1}}',
                        '{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {"s": "a"}}'),
             "mistral": ('[TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}}]',
                         '[TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]')}
    for name, (one, two) in cases.items():
        fmt = FORMATS[name]
        single = vocab.lark(call_grammar(fmt, FUNCS, parallel=False, special={}))
        parallel = vocab.lark(call_grammar(fmt, FUNCS, parallel=True, special={}))
        assert single.accepts(one) and not single.accepts(two), name
        assert parallel.accepts(one) and parallel.accepts(two), name
        assert not single.accepts(one.replace('"x": 1', '"x": "1"')), name  # arguments follow the schema
        assert not single.accepts(one.replace('"f"', '"h"')), name  # only the given functions
        assert len(fmt.parse(two)[1]) == 2
    many = "\n".join([HERMES_TEMPLATE_CALL] * (MAX_PARALLEL_CALLS + 1))
    assert not vocab.lark(call_grammar(FORMATS["hermes"], FUNCS, True, {})).accepts(many)


def test_tool_stream_holds_back_only_what_may_be_a_call():
    s = ToolStream(FORMATS["hermes"])
    out = "".join(s.feed(p) for p in ["Hi ", "there <tool", "_call>\n{\"name\": \"f\", ", '"arguments": {}}',
                                      "\n</tool_call>"])
    rest, calls = s.finish()
    assert out + rest == "Hi there " and [c.name for c in calls] == ["f"]
    s = ToolStream(FORMATS["hermes"])
    out = "".join(s.feed(p) for p in ["a <tool", "box> b"])
    assert out + s.finish()[0] == "a <toolbox> b"
    s = ToolStream(FORMATS["llama3"])
    assert s.feed("  ") == "" and s.feed("Hello {x}") == "  Hello {x}"
    s = ToolStream(FORMATS["llama3"])
    assert s.feed('{"name": "f", "parameters": {}}') == "" and s.finish()[1][0].name == "f"


def test_detect_format_and_prepare_messages():
    from lmforge.tokenizer.chat import DEFAULT_CHAT_TEMPLATE

    assert detect_format(DEFAULT_CHAT_TEMPLATE).name == "hermes"
    assert detect_format("{{ '[TOOL_CALLS] [' }}").name == "mistral"
    assert detect_format("{{ '<|python_tag|>' }}<|eot_id|>").name == "llama3"
    assert detect_format("{{ messages }}") is None and detect_format(None) is None
    msgs = prepare_messages([{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}])
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
