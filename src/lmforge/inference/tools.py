"""Tool calls in the formats chat models were trained on: find a model's format, parse calls out of its text
(whole or streamed), and the grammar that makes a required or named call always parse.

Owns: the three formats of the supported families, each as its chat templates write an assistant's call —
  - hermes  (Qwen2/2.5, Hermes, lmforge's default template): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
    one block per call;
  - llama3  (Llama 3.1/3.2 JSON tool calling): `{"name": ..., "parameters": {...}}`, calls joined by "; ",
    optionally after <|python_tag|>;
  - mistral (Mistral v3 tokenizers): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`;
`detect_format` (which one a chat template speaks, from the markers it writes), `prepare_messages` (an
OpenAI conversation for the template: a call's `arguments` JSON string becomes the object templates expect, as
vLLM does), `parse_calls` (text -> content + calls), `ToolStream` (the same, incrementally: text that may be
the start of a call is held back until it is one or cannot be), and `call_grammar` (Lark for llguidance: the
format's wrapper around each function's parameter schema).
Leaves to the chat template how tools are shown to the model (the `tools` variable), to constrain.py the
grammar engine, and to serve/ the OpenAI shapes (ids, deltas, finish_reason "tool_calls").

Decisions:
- A call's arguments are handed back as JSON text in json.dumps' layout (what the grammar writes, and what a
  streamed call assembles to), whatever spacing the model used.
- Constrained calls: one call for a named function or parallel_tool_calls=false; otherwise 1 to
  MAX_PARALLEL_CALLS calls (a bound, so a model cannot loop on calls until max_tokens cuts one in half).
- Text that does not parse as the format's calls is content, never an error (auto mode: the model chose to
  answer in words).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.inference.constrain import JSON_OPTIONS, close_objects, schema_json

MAX_PARALLEL_CALLS = 8


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of the arguments object


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _call_from(obj: Any, args_key: str) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], _dump(args))


class ToolFormat:
    """One family's way of writing tool calls. Subclasses say how calls look and how to find them."""

    name: str = ""
    opener: str = ""  # text that starts a call (held back while streaming)
    only_at_start = False  # a call may only open the reply (llama3's bare JSON)

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        """(content outside calls, calls). No calls: the whole text is content."""
        raise NotImplementedError

    def grammar(self, bodies: list[str], parallel: bool, special: dict[str, int]) -> str:
        """Lark text for calls whose JSON objects match one of `bodies` (schema JSON texts)."""
        raise NotImplementedError

    def call_start(self, text: str) -> int:
        """Index where a call opens in `text`, or -1."""
        if self.only_at_start:
            stripped = text.lstrip()
            return len(text) - len(stripped) if stripped.startswith(self.opener) else -1
        return text.find(self.opener)

    def may_open(self, text: str) -> int:
        """Length of the longest tail of `text` that could still grow into the opener (0: none)."""
        if self.only_at_start:  # nothing but whitespace yet: the reply may still open with a call
            return len(text) if not text.strip() else 0
        for k in range(min(len(self.opener) - 1, len(text)), 0, -1):
            if text.endswith(self.opener[:k]):
                return k
        return 0


class Hermes(ToolFormat):
    name, opener = "hermes", "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        start = text.find(self.opener)
        if start < 0:
            return text, []
        calls = []
        for m in self._block.finditer(text, start):
            try:
                call = _call_from(json.loads(m.group(1)), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return text[:start].rstrip(), calls

    def grammar(self, bodies: list[str], parallel: bool, special: dict[str, int]) -> str:
        more = f' ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
        return (f"start: call{more}\n"
                'call: "<tool_call>\\n" body "\\n</tool_call>"\n'
                f"body: %json {_any_of(bodies)}\n")


class Llama3(ToolFormat):
    name, opener, only_at_start = "llama3", "{", True

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        calls: list[ParsedCall] = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            call = _call_from(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            rest = body[end:].lstrip()
            if not rest:
                break
            if not rest.startswith(";"):
                return text, []
            pos = len(body) - len(rest[1:].lstrip())
        return "", calls

    def grammar(self, bodies: list[str], parallel: bool, special: dict[str, int]) -> str:
        more = f' ("; " body){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
        return f"start: body{more}\nbody: %json {_any_of(bodies)}\n"


class Mistral(ToolFormat):
    name, opener = "mistral", "[TOOL_CALLS]"

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        start = text.find(self.opener)
        head, body = (text[:start], text[start + len(self.opener):]) if start >= 0 else ("", text)
        body = body.strip()
        if not body.startswith("["):  # the [TOOL_CALLS] token itself is special: decoded text may lack it
            return text, []
        try:
            items = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        items = items if isinstance(items, list) else [items]
        calls = [_call_from(x, "arguments") for x in items]
        if not calls or any(c is None for c in calls):
            return text, []
        return head.rstrip(), calls

    def call_start(self, text: str) -> int:
        i = text.find(self.opener)
        if i >= 0:
            return i
        stripped = text.lstrip()  # the special token was skipped in decoding: a reply that opens a list
        return len(text) - len(stripped) if stripped.startswith('[{"') else -1

    def grammar(self, bodies: list[str], parallel: bool, special: dict[str, int]) -> str:
        opener = f"<[{special[self.opener]}]>" if self.opener in special else '"[TOOL_CALLS]"'
        one = _any_of(bodies)
        items = f'{{{_LAYOUT}, "type": "array", "items": {one}, "minItems": 1, "maxItems": ' \
                f'{MAX_PARALLEL_CALLS if parallel else 1}}}'
        return f'start: {opener} " " calls\ncalls: %json {items}\n'


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (Hermes(), Llama3(), Mistral())}


_LAYOUT = '"x-guidance": ' + schema_json(JSON_OPTIONS)  # inline %json schemas take the JSON layout this way


def _any_of(bodies: list[str]) -> str:
    return '{' + _LAYOUT + ', "anyOf": [' + ", ".join(bodies) + "]}"


def detect_format(template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template writes, from its markers; None if it shows no tools."""
    if not template:
        return None
    if "<tool_call>" in template:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if "<|python_tag|>" in template or ("<|eot_id|>" in template and "parameters" in template
                                         and "tools" in template):
        return FORMATS["llama3"]
    return None


def function_of(tool: Any) -> dict:
    """The `function` object of an OpenAI tool ({"type": "function", "function": {...}}), checked."""
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) \
            or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise LmforgeError("each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': {...}}}")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise LmforgeError(f"tool '{fn['name']}': parameters must be a JSON Schema object")
    return {**fn, "parameters": params}


def call_grammar(fmt: ToolFormat, functions: Sequence[dict], parallel: bool, special: dict[str, int]) -> str:
    """Lark text: one call (or up to MAX_PARALLEL_CALLS when `parallel`) of one of `functions`, each call's
    arguments valid under that function's parameters."""
    args_key = "parameters" if fmt.name == "llama3" else "arguments"
    bodies = []
    for fn in functions:
        params = close_objects(fn.get("parameters") or {"type": "object", "properties": {}})
        if params.get("type") is None and "properties" in params:
            params = {**params, "type": "object"}
        bodies.append(schema_json({"type": "object", "properties": {"name": {"const": fn["name"]},
                                                                    args_key: params},
                                   "required": ["name", args_key], "additionalProperties": False}))
    return fmt.grammar(bodies, parallel, special)


def prepare_messages(messages: list[dict]) -> list[dict]:
    """Messages for a chat template: an assistant's tool call `arguments` given as JSON text (OpenAI's
    shape) become the object the templates serialise (HF's convention)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            fixed = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        fn = {**fn, "arguments": json.loads(fn["arguments"])}
                    except json.JSONDecodeError:
                        pass
                    c = {**c, "function": fn}
                fixed.append(c)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


def parse_calls(fmt: ToolFormat, text: str) -> tuple[str, list[ParsedCall]]:
    """(content, calls) of a whole reply."""
    return fmt.parse(text)


class ToolStream:
    """A reply's text as it streams: content deltas while it is content, calls once the text is complete.

    Text from the opener on (or a tail that may grow into it) is held back; at the end the held text is
    parsed: calls if it parses, otherwise it is released as content."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.text = ""
        self.released = 0  # text[:released] went out as content
        self.opened = -1  # where a call opens, once seen

    def feed(self, delta: str) -> str:
        """Add text; the content that may go out now."""
        self.text += delta
        if self.opened < 0:
            self.opened = self.fmt.call_start(self.text[self.released:])
            if self.opened >= 0:
                self.opened += self.released
        if self.opened >= 0:
            out, self.released = self.text[self.released:self.opened], max(self.released, self.opened)
            return out
        hold = self.fmt.may_open(self.text[self.released:])
        end = len(self.text) - hold
        out = self.text[self.released:end]
        self.released = max(self.released, end)
        return out

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """At the end: (content still held, calls)."""
        if self.opened < 0:
            rest, self.released = self.text[self.released:], len(self.text)
            return rest, []
        content, calls = self.fmt.parse(self.text)
        if not calls:
            rest, self.released = self.text[self.released:], len(self.text)
            return rest, []
        # content before the calls already went out up to `released`; what parse kept beyond it goes now
        rest = content[self.released:] if len(content) > self.released else ""
        self.released = len(self.text)
        return rest, calls
