"""Parity with transformers: a tokenizer lmforge saves loads with AutoTokenizer and gives the same ids, decodes and
chat strings; lmforge's renderer gives transformers' string for Llama-3, Qwen2 (ChatML), Mistral and Zephyr-style
templates; directories transformers writes (chat_template.jinja, add_bos_token) load into lmforge the same way."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jinja2  # noqa: E402
import pytest  # noqa: E402

from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")

# Hand-written templates in the style of each family (system handling, bos_token, raise_exception on bad roles),
# indented the way Hub templates are, so trim_blocks/lstrip_blocks matter.
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Year: " + strftime_now("%Y") + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in loop_messages %}
    {%- if message['role'] not in ['user', 'assistant', 'ipython'] %}
        {{- raise_exception("Unknown role '" + message['role'] + "' after the system message") }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHATML_QWEN2 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "system" and loop.first %}
    {%- elif message.role in ["user", "system", "assistant"] %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- raise_exception('Unsupported role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# No whitespace control at all: only trim_blocks and lstrip_blocks keep newlines out.
ZEPHYR = """{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
    {% endif %}
{% endfor %}"""

# The {% generation %} tag that marks assistant text for SFT masks (transformers' AssistantTracker).
GENERATION = ("{% for m in messages %}{{ '<|' + m.role + '|>' }}{% if m.role == 'assistant' %}{% generation %}"
              "{{ m.content + eos_token }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")

TEMPLATES = {"llama3": LLAMA3, "qwen2": CHATML_QWEN2, "mistral": MISTRAL, "zephyr": ZEPHYR, "generation": GENERATION}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  You are terse.  "}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Hi 👋 你好"},
     {"role": "assistant", "content": "Hello <b>&amp; \"quoted\"</b>", "tool_calls": None},
     {"role": "user", "content": "e\u0301\n\tcontrol\x01"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]

BAD = {
    "llama3": [{"role": "system", "content": "s"}, {"role": "wizard", "content": "x"}],
    "qwen2": [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}],
    "mistral": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
}


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    """The session tokenizer saved by lmforge and loaded back by both lmforge and transformers."""
    d = tmp_path_factory.mktemp("lmforge_tok")
    tok.save(d)
    return Tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(str(d)), d


def test_autotokenizer_loads_lmforge_tokenizer(saved):
    ours, hf, _ = saved
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert len(hf) == ours.vocab_size
    texts = ["Hello world", "  spaces  ", "🎉 机器学习 e\u0301 \x00\x1f", "<|im_start|>user\nhi<|im_end|>\n",
             "Numbers 1234567 and code: def f(x): return x**2\n"]
    for text in texts:
        assert hf.encode(text) == ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False)
        ids = ours.encode(text)
        for skip in (True, False):
            assert hf.decode(ids, skip_special_tokens=skip) == ours.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("gen", [False, True])
def test_apply_chat_template_matches_for_saved_tokenizer(saved, gen):
    ours, hf, _ = saved
    for msgs in CONVERSATIONS:
        expected = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == expected
        assert hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False) == \
            ours.encode(expected, add_special_tokens=False)
    parts = [{"role": "user", "content": [{"type": "text", "text": "look: "}, {"type": "image", "url": "x.png"},
                                          {"type": "text", "text": "🐱"}]}]
    assert ours.apply_chat_template(parts, gen) == hf.apply_chat_template(parts, tokenize=False,
                                                                          add_generation_prompt=gen)


@pytest.mark.parametrize("family", list(TEMPLATES))
@pytest.mark.parametrize("gen", [False, True])
def test_family_templates_render_like_transformers(saved, family, gen):
    ours, hf, _ = saved
    template = TEMPLATES[family]
    for msgs in CONVERSATIONS:
        if family == "mistral" and msgs[-1]["role"] != "user":
            continue
        expected = hf.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen, chat_template=template) == expected
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter für 東京",
                                               "parameters": {"type": "object", "properties": {}}}}]
    msgs = CONVERSATIONS[1]
    expected = hf.apply_chat_template(msgs, chat_template=template, tools=tools, tokenize=False,
                                      add_generation_prompt=gen)
    assert ours.apply_chat_template(msgs, gen, chat_template=template, tools=tools) == expected


@pytest.mark.parametrize("family", list(BAD))
def test_bad_roles_raise_like_transformers(saved, family):
    ours, hf, _ = saved
    with pytest.raises(jinja2.exceptions.TemplateError) as theirs:
        hf.apply_chat_template(BAD[family], chat_template=TEMPLATES[family], tokenize=False)
    with pytest.raises(LmforgeError) as mine:
        ours.apply_chat_template(BAD[family], chat_template=TEMPLATES[family])
    assert theirs.value.message in str(mine.value)


def test_directory_written_by_transformers_loads_the_same(saved, tmp_path):
    """transformers 5 writes the template to chat_template.jinja; lmforge reads it, and keeps ids and strings."""
    ours, hf, _ = saved
    hf.chat_template = MISTRAL
    try:
        hf.save_pretrained(tmp_path)
    finally:
        hf.chat_template = ours.chat_template
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (tmp_path / "chat_template.jinja").is_file() and "chat_template" not in config
    back = Tokenizer.load(tmp_path)
    assert back.chat_template == MISTRAL
    msgs = CONVERSATIONS[2]
    assert back.apply_chat_template(msgs) == hf.apply_chat_template(msgs, chat_template=MISTRAL, tokenize=False)
    assert back.encode("Hi 👋 [INST]") == ours.encode("Hi 👋 [INST]")


def test_add_bos_token_config_and_template_list_match_transformers(saved, tmp_path):
    ours, _, d = saved
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    config["chat_template"] = [{"name": "default", "template": LLAMA3}, {"name": "tool_use", "template": ZEPHYR}]
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    mine = Tokenizer.load(tmp_path)
    # transformers 5 ignores add_bos_token when tokenizer.json exists: its post-processor alone decides.
    assert hf.encode("hello") == mine.encode("hello") == ours.encode("hello")
    msgs = CONVERSATIONS[1]
    assert mine.apply_chat_template(msgs, True) == hf.apply_chat_template(msgs, tokenize=False,
                                                                          add_generation_prompt=True)
    assert mine.apply_chat_template(msgs, tools=[]) == hf.apply_chat_template(msgs, tools=[], tokenize=False)


def test_bos_post_processor_matches_transformers(saved, tmp_path):
    """A Llama-3-style tokenizer.json whose post-processor adds BOS: both add it, only when asked."""
    from tokenizers import processors

    ours, _, d = saved
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    data = json.loads((d / "tokenizer.json").read_text())
    bos = ours.bos_token
    data["post_processor"] = json.loads(processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ours.bos_id)]).__getstate__())
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    mine = Tokenizer.load(tmp_path)
    for text in ("hello", "🎉 x"):
        assert hf.encode(text) == mine.encode(text) == [ours.bos_id] + ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == mine.encode(text, add_special_tokens=False)
