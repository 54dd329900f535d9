"""Chat templates: render a list of messages to the prompt string a model was trained on.

This module owns the Jinja environment that chat templates run in and the default template of the models lmforge
trains. The contract is parity: for the same template, messages and options, `render` returns the same string as
transformers' `tokenizer.apply_chat_template(..., tokenize=False)`. So the environment is set up the way
transformers sets up its own (checked against transformers 5.x by tests/tokenizer/test_transformers_parity.py):

- `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols` extension and the
  `{% generation %}...{% endgeneration %}` tag (it renders its body unchanged; `render_with_spans` reports where);
- globals `raise_exception(message)`, `strftime_now(format)`, a `dict` that only constructs, and a `namespace` that
  refuses underscore-prefixed names (templates come from the Hub: untrusted code);
- a `tojson` filter that does not HTML-escape and keeps non-ASCII (`ensure_ascii=False`, optional `indent`,
  `separators`, `sort_keys`);
- the inputs the template sees are rebuilt from plain JSON types (pydantic models and dataclasses become dicts),
  message keys whose value is None are dropped, `tools` and `documents` are always defined (None when absent),
  special tokens that are None are left undefined (they render as ''), and a message's reasoning under
  `reasoning`/`thinking`/`reasoning_content` is visible under both `reasoning_content` and `thinking`.

What users can get wrong (a template with a syntax error, a template's `raise_exception`, messages that are not
dicts, a template that trips the sandbox's limits such as range() over 100,000) raises LmforgeError with the
template's own message. Tokenizing the rendered string is tokenizer.py's job.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

from lmforge.errors import LmforgeError

# ChatML (https://github.com/openai/openai-python/blob/release-v0.28.0/chatml.md), as Qwen2 uses it: no BOS, every
# turn is `<|im_start|>ROLE\nCONTENT<|im_end|>\n`, and a generation prompt opens an assistant turn. An assistant
# turn therefore ends with <|im_end|>, which inference treats as a stop token. Content may be a string or a list of
# OpenAI-style parts, of which the text parts are joined. With `tools`, it writes Qwen2.5's Hermes-style tool
# prompt (function signatures in <tools>, calls as <tool_call> JSON blocks, results as <tool_response> in a user
# turn), so models lmforge trains learn the format inference/tools.py parses; without tools the text is ChatML.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' and messages[0]['content'] is string -%}"
    "{{- messages[0]['content'] + '\\n\\n' -}}"
    "{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'"
    " + 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '"
    " + 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'"
    " + '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if tools and loop.first and message['role'] == 'system' and message['content'] is string -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + (message['content'] if message['content'] is string else '')"
    " + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined -%}"
    "{%- for call in message['tool_calls'] if (call['function'] is defined and call['function']['name'] is defined)"
    " or call['name'] is defined -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- if not loop.first or (message['content'] is string and message['content']) -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' -}}"
    "{{- fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) -}}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Names under which a message's reasoning arrives; templates read the first.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

# While `render_with_spans` runs: (chunks rendered so far, spans found so far).
_SPAN_RECORDER: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar(
    "lmforge_chat_spans", default=None)


@lru_cache(maxsize=1)
def _environment() -> Any:
    """The sandboxed Jinja environment every template is compiled in (built once, on first use)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}body{% endgeneration %}` renders body; when recording, notes its character span."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark", []), [], [], body).set_lineno(lineno)

        def _mark(self, caller: Any) -> str:
            text = caller()
            recorder = _SPAN_RECORDER.get()
            if recorder is not None:
                chunks, spans = recorder
                start = sum(len(c) for c in chunks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson HTML-escapes (<, >, &, ') and forces ASCII; chat templates expect plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class ConstructOnlyDict:
        """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the type itself."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not store underscore-prefixed attributes on a namespace (got {name!r})")

    class SafeNamespace(Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # self is args[0], as in jinja's Namespace
            self, rest = args[0], args[1:]
            for key in dict(*rest, **kwargs):
                _check_name(key)
            Namespace.__init__(self, *rest, **kwargs)

        def __setitem__(self, name: str, value: Any) -> None:
            _check_name(name)
            Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = ConstructOnlyDict()
    env.globals["namespace"] = SafeNamespace
    return env


@lru_cache(maxsize=64)
def _compile(template: str) -> Any:
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LmforgeError(f"chat template has a syntax error at line {e.lineno}: {e.message}; "
                           "fix the template (tokenizer_config.json 'chat_template' or chat_template.jinja)") from None


def _plain(value: Any) -> Any:
    """Rebuild `value` from JSON types so the sandbox never sees methods of foreign objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and type(value).__module__ == "numpy":  # numpy scalars
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. the openai client's messages
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"  # anything else is an inert placeholder


def normalize_messages(messages: Any) -> list[dict]:
    """The messages as the template sees them: plain dicts, None-valued keys dropped, reasoning aliased."""
    if isinstance(messages, (str, bytes, Mapping)) or not hasattr(messages, "__iter__"):
        raise LmforgeError("chat messages must be a list of {'role': ..., 'content': ...} dicts, "
                           f"got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if dataclasses.is_dataclass(message) and not isinstance(message, type):
            message = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
        elif callable(getattr(message, "model_dump", None)):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise LmforgeError(f"chat message {i} must be a dict with 'role' and 'content', got {message!r}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    if not out:
        raise LmforgeError("cannot render an empty conversation; give at least one message")
    return out


def _context(messages: Any, add_generation_prompt: bool, bos_token: str | None, eos_token: str | None,
             tools: list[dict] | None, documents: list[dict] | None, extra: dict) -> dict:
    for name, items in (("tools", tools), ("documents", documents)):
        if items is not None and not all(isinstance(x, Mapping) for x in items):
            raise LmforgeError(f"chat {name} must be a list of JSON-schema dicts")
    special = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    extra = {k: v for k, v in extra.items() if not (k.endswith("_token") and v is None)}
    return {"messages": normalize_messages(messages), "tools": _plain(tools), "documents": _plain(documents),
            "add_generation_prompt": add_generation_prompt, **_plain({**special, **extra})}


def _run(template: str, context: dict, recorder: tuple[list[str], list[tuple[int, int]]] | None) -> str:
    import jinja2

    if not isinstance(template, str):
        raise LmforgeError(f"a chat template must be a string of Jinja, got {type(template).__name__}")
    compiled = _compile(template)
    token = _SPAN_RECORDER.set(recorder)
    try:
        if recorder is None:
            return compiled.render(**context)
        chunks = recorder[0]
        for chunk in compiled.generate(**context):
            chunks.append(chunk)
        return "".join(chunks)
    except jinja2.exceptions.TemplateError as e:
        raise LmforgeError(f"chat template error: {e.message or e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError) as e:
        # ArithmeticError: ZeroDivisionError, and the OverflowError of the sandbox's range() limit
        raise LmforgeError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
    finally:
        _SPAN_RECORDER.reset(token)


def render(template: str, messages: Any, add_generation_prompt: bool = False, bos_token: str | None = None,
           eos_token: str | None = None, *, tools: list[dict] | None = None, documents: list[dict] | None = None,
           **extra: Any) -> str:
    """Render `messages` with the Jinja chat `template`, exactly as transformers' apply_chat_template(tokenize=False).

    `extra` reaches the template as variables (other special tokens such as pad_token, or template switches such as
    enable_thinking); special tokens passed as None stay undefined, as in transformers.
    """
    return _run(template, _context(messages, add_generation_prompt, bos_token, eos_token, tools, documents, extra),
                None)


def render_with_spans(template: str, messages: Any, add_generation_prompt: bool = False,
                      bos_token: str | None = None, eos_token: str | None = None, *,
                      tools: list[dict] | None = None, documents: list[dict] | None = None,
                      **extra: Any) -> tuple[str, list[tuple[int, int]]]:
    """`render`, plus the [start, end) character spans the template marked with {% generation %} (assistant text).

    Templates without the tag give no spans; SFT masking then falls back to rendering prefixes of the conversation.
    """
    recorder: tuple[list[str], list[tuple[int, int]]] = ([], [])
    text = _run(template, _context(messages, add_generation_prompt, bos_token, eos_token, tools, documents, extra),
                recorder)
    return text, recorder[1]
