"""The chat renderer on its own: the default ChatML template, the sandbox, the helpers templates use, and errors."""

import dataclasses
import json

import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer.chat import DEFAULT_CHAT_TEMPLATE, render, render_with_spans

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi 👋"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]


def test_default_template_is_chatml():
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 👋<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n")
    assert render(DEFAULT_CHAT_TEMPLATE, CONVERSATION) == expected
    assert render(DEFAULT_CHAT_TEMPLATE, CONVERSATION, add_generation_prompt=True) == \
        expected + "<|im_start|>assistant\n"


def test_default_template_content_parts_and_missing_content():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}},
                                          {"type": "text", "text": "b"}]},
             {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    assert render(DEFAULT_CHAT_TEMPLATE, parts) == \
        "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"


def test_helpers_tojson_strftime_namespace_loopcontrols():
    template = ("{{ messages[0] | tojson }}|{{ {'a': [1, 2]} | tojson(indent=2) }}|{{ strftime_now('%Y') | length }}"
                "|{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ dict(x=1).x }}")
    msgs = [{"role": "user", "content": "<b>&'é中🎉"}] * 3
    out = render(template, msgs).split("|")
    assert out[0] == json.dumps(msgs[0], ensure_ascii=False)  # no HTML escaping, no \\u escapes
    assert out[1] == json.dumps({"a": [1, 2]}, indent=2)
    assert out[2:] == ["4", "2", "1"]


def test_trim_and_lstrip_blocks():
    template = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}"
    assert render(template, CONVERSATION) == "U:Hi 👋\nU:2+2?\n"


def test_special_tokens_and_extra_variables():
    template = "[{{ bos_token }}][{{ eos_token }}][{{ pad_token }}][{{ tools }}][{{ documents }}][{{ flag }}]"
    assert render(template, CONVERSATION, bos_token="<s>", eos_token="</s>", flag=True) == \
        "[<s>][</s>][][None][None][True]"


def test_inputs_are_plain_data():
    @dataclasses.dataclass
    class Msg:
        role: str
        content: str
        name: str | None = None

    class Pydantic:  # anything with model_dump, like the openai client's message objects
        def model_dump(self):
            return {"role": "user", "content": "from pydantic", "extra": None}

    template = "{% for m in messages %}{{ m.role }}:{{ m.content }}:{{ m.name is defined }}:{{ m.extra is defined }};" \
               "{% endfor %}"
    assert render(template, [Msg("user", "hi"), Pydantic()]) == "user:hi:False:False;user:from pydantic:False:False;"


def test_reasoning_is_aliased():
    msgs = [{"role": "assistant", "content": "4", "reasoning": "2+2"}]
    assert render("{{ messages[0].reasoning_content }}/{{ messages[0].thinking }}", msgs) == "2+2/2+2"


def test_generation_spans():
    template = ("{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}"
                "{{ m.content }}</a>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    text, spans = render_with_spans(template, CONVERSATION)
    assert text == render(template, CONVERSATION)
    assert [text[a:b] for a, b in spans] == ["Hello!</a>"]


@pytest.mark.parametrize("template, messages, message", [
    ("{{ raise_exception('roles must alternate') }}", CONVERSATION, "chat template error: roles must alternate"),
    ("{% for m in messages %}{{ m.content }", CONVERSATION, "syntax error at line 1"),
    ("{% if %}", CONVERSATION, "syntax error"),
    ("{{ messages.append(1) }}", CONVERSATION, "chat template error"),  # the sandbox forbids mutation
    ("{% set ns = namespace(_secret=1) %}", CONVERSATION, "underscore"),
    ("{{ messages[0].content + 1 }}", CONVERSATION, "failed on these messages"),
    ("x", [], "empty conversation"),
    ("x", "hello", "list of"),
    ("x", ["hello"], "message 0"),
    (None, CONVERSATION, "must be a string"),
])
def test_errors(template, messages, message):
    with pytest.raises(LmforgeError, match=message):
        render(template, messages)


def test_sandbox_blocks_attribute_escapes():
    # Dunder access yields undefined (renders empty) instead of exposing Python internals.
    assert render("{{ ''.__class__ }}{{ messages.__class__ }}", CONVERSATION) == ""
    with pytest.raises(LmforgeError):
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}", CONVERSATION)
