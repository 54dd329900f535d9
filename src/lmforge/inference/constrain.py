"""Constrained decoding: a grammar (JSON Schema, regex, a choice of strings, Lark) becomes a per-step token mask.

Owns: `Vocabulary` (a model's tokenizer as the grammar engine sees it, built once per served model),
`Grammar` (one request's constraint, compiled and checked: what a client got wrong is a `GrammarError` naming
the keyword, before anything is queued), `Constraint` (one generation's matcher: it says which tokens may
come next and is advanced with the token sampled), and `allowed_tokens` (the masks of every constrained row
of a batch, filled in one call). Leaves to the engine when to ask (engine.py: a constrained row gets its mask
before sampling and is advanced after; a row without a constraint costs nothing), to sampling.py how a mask
is applied (-inf before penalties and temperature), and to serve/ which request field means which grammar.

The grammar engine is llguidance (Microsoft's; the one vLLM and SGLang use for these features): an Earley
parser over a lexer on the tokenizer's byte trie, so a mask costs tens of microseconds per token, not a pass
over the vocabulary; benchmarks/bench_constrain.py measures it here. It reads tokenizer.json as it is.

Decisions:
- JSON has one layout, json.dumps' (`{"a": 1, "b": [1, 2]}`): free whitespace between tokens is the commonest
  way constrained JSON never ends (a model loops on newlines and spaces; vLLM's and llama.cpp's trackers are
  full of it), and this is the layout models saw most.
- An object schema that lists `properties` and says nothing of other keys is closed (additionalProperties
  false), as xgrammar's strict mode, vLLM's default, treats it: the output still validates against the schema
  as given, and a model cannot wander into keys nobody asked for. A schema that wants other keys says so.
- A schema keyword the engine cannot enforce (`uniqueItems`, `if`/`then`, an unknown `format`, ...) is an
  error, never silently dropped: llguidance reports what it did not implement, and the message names it.
- The generation ends when the grammar is complete and can take no more tokens (after the closing brace of
  a JSON object); while it could go on or stop (a regex like `a+`), the model's end-of-turn ids are allowed
  exactly when the grammar accepts.
- Masks for many rows are filled by one LLExecutor call (Rust threads, the GIL released); rows share one
  bitmask buffer per batch width.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError

# JSON is written as Python's json.dumps writes it (", " and ": ", no other whitespace): see the module docstring
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(LmforgeError):
    """A grammar or schema the engine cannot honour; `keyword` names the schema keyword when there is one."""

    def __init__(self, message: str, keyword: str | None = None):
        super().__init__(message)
        self.keyword = keyword


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise LmforgeError("constrained decoding (response_format, tools, guided output) needs the package "
                           "llguidance: pip install llguidance") from None
    return llguidance


class Vocabulary:
    """A model's tokenizer for the grammar engine: the token trie, the mask width, the ids that end a turn.

    vocab_size is the model's (its logits' width, which may exceed the tokenizer's: padding rows are never
    allowed). stop_ids are the ids the mask allows when the grammar is complete (EOS, <|im_end|>, ...)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Sequence[int]):
        llg = _llguidance()
        stops = sorted({int(i) for i in stop_ids if 0 <= int(i) < vocab_size})
        if not stops:
            raise LmforgeError("constrained decoding needs an end-of-sequence id (the model's EOS or end-of-turn "
                               "token); this model has none")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = frozenset(stops)
        self.ll = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=stops)
        self.words = (vocab_size + 31) // 32  # int32 words per bitmask row
        self._executor = llg.LLExecutor()
        self._lock = threading.Lock()
        self._buffers: dict[int, np.ndarray] = {}

    # ---- grammars ---------------------------------------------------------------------------------------
    def json_schema(self, schema: Any, what: str = "the JSON schema") -> Grammar:
        """Output that is one JSON value valid under `schema` (a dict, or True for any JSON value)."""
        llg = _llguidance()
        if schema is True or schema == {}:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError(f"{what} must be a JSON object (a JSON Schema), got {type(schema).__name__}")
        try:
            source = llg.LLMatcher.grammar_from_json_schema(close_objects(schema), defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"{what} is not valid: {e}") from None
        return Grammar(self, source, what)

    def json_object(self) -> Grammar:
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return self.json_schema({"type": "object"}, "JSON mode")

    def regex(self, pattern: str) -> Grammar:
        """Output that matches `pattern` whole (Rust `regex` syntax, which Python's `re` mostly shares)."""
        if not isinstance(pattern, str):
            raise GrammarError(f"the regex must be a string, got {type(pattern).__name__}")
        return Grammar(self, _llguidance().LLMatcher.grammar_from_regex(pattern), "the regex")

    def choice(self, options: Sequence[str]) -> Grammar:
        """Output that is exactly one of `options`."""
        if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError("the choice must be a non-empty list of non-empty strings")
        return self.regex("|".join(re.escape(o) for o in options))

    def lark(self, grammar: str, what: str = "the grammar") -> Grammar:
        """Output in the language of a Lark grammar (llguidance's dialect: `%json {...}` inlines a schema,
        `<|name|>` / `<[id]>` name special tokens)."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError(f"{what} must be a non-empty Lark grammar string")
        return Grammar(self, _llguidance().LLMatcher.grammar_from_lark(grammar), what)

    # ---- masks ------------------------------------------------------------------------------------------
    def buffer(self, rows: int) -> np.ndarray:
        buf = self._buffers.get(rows)
        if buf is None:
            buf = self._buffers[rows] = np.zeros((rows, self.words), dtype=np.int32)
        return buf


_KEYS = re.compile(r'Unimplemented keys: \[([^\]]*)\]')
_FORMAT = re.compile(r'Unknown format: (\S+)')


def _explain(message: str, what: str) -> GrammarError:
    """llguidance's error as a client reads it: which keyword, when it is about one."""
    first = message.strip().splitlines()[0] if message.strip() else "invalid grammar"
    m = _KEYS.search(message)
    if m:
        keys = [k.strip().strip('"') for k in m.group(1).split(",") if k.strip()]
        names = ", ".join(f"'{k}'" for k in keys)
        return GrammarError(f"{what} uses {names}, which constrained decoding cannot enforce here; remove "
                            f"{'it' if len(keys) == 1 else 'them'} (or express the constraint another way)",
                            keys[0] if keys else None)
    m = _FORMAT.search(message)
    if m:
        return GrammarError(f"{what} uses 'format': '{m.group(1)}', a format constrained decoding does not know; "
                            "remove it or use 'pattern'", "format")
    return GrammarError(f"{what} cannot be used: {first}")


class Grammar:
    """A compiled, checked constraint, shared by the n choices of a request; `start()` gives each its own."""

    def __init__(self, vocab: Vocabulary, source: str, what: str = "the grammar"):
        llg = _llguidance()
        self.vocab, self.source, self.what = vocab, source, what
        proto = llg.LLMatcher(vocab.ll, source, log_level=0)  # compiles the lexer; copies are cheap
        if proto.is_error():
            raise _explain(proto.get_error(), what)
        self._proto = proto

    def start(self) -> Constraint:
        return Constraint(self._proto.deep_copy(), self.vocab)

    def accepts(self, text: str) -> bool:
        """Whether `text` is a complete sentence of the grammar (tests, checks)."""
        m = self._proto.deep_copy()
        ids = self.vocab.tokenizer.encode(text, add_special_tokens=False)
        return m.try_consume_tokens(ids) == len(ids) and not m.is_error() and m.is_accepting()


class Constraint:
    """One generation's position in its grammar. Engine thread only."""

    def __init__(self, matcher, vocab: Vocabulary):
        self.matcher, self.vocab = matcher, vocab

    def advance(self, token: int) -> None:
        """Take the sampled token; LmforgeError if the grammar refuses it (a mask/sampler bug)."""
        if not self.matcher.consume_token(int(token)):
            raise LmforgeError(f"the grammar refused token {token}: {self.matcher.get_error() or 'not allowed'}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and takes no more tokens: the generation ends here."""
        return self.matcher.is_stopped()

    def ended_by(self, token: int) -> bool:
        """Whether `token` (an end-of-turn id) is what the grammar allowed as its end."""
        return token in self.vocab.stop_ids and self.matcher.is_accepting()


def allowed_tokens(constraints: Sequence[Constraint | None], vocab_size: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [R, vocab_size]: which ids each row may sample next (all True for a row without a constraint).

    One LLExecutor call fills every constrained row's bitmask; the unpacking is one numpy call."""
    rows = [(i, c) for i, c in enumerate(constraints) if c is not None]
    vocab = rows[0][1].vocab
    R = len(constraints)
    out = torch.ones((R, vocab_size), dtype=torch.bool)
    with vocab._lock:
        buf = vocab.buffer(len(rows))
        vocab._executor.unsafe_compute_mask_ptr([(c.matcher, j) for j, (_, c) in enumerate(rows)],
                                               buf.ctypes.data, vocab.words * 4, len(rows))
        bits = np.unpackbits(buf.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]  # little-endian words
    bits_t = torch.from_numpy(bits.astype(np.bool_))
    dead = ~bits_t.any(1)
    if dead.any():  # a matcher in an error state allows nothing: let it end rather than sample from nothing
        bits_t[dead.nonzero()[:, 0][:, None], torch.tensor(sorted(vocab.stop_ids))[None]] = True
    idx = torch.tensor([i for i, _ in rows])
    if vocab_size > bits_t.shape[1]:  # model rows past the mask width (never the case with vocab.vocab_size)
        bits_t = torch.nn.functional.pad(bits_t, (0, vocab_size - bits_t.shape[1]))
    out[idx] = bits_t
    return out.to(device)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalItems", "contains", "not", "additionalProperties", "propertyNames", "if",
               "then", "else", "unevaluatedItems", "unevaluatedProperties")


def close_objects(schema: Any) -> Any:
    """A copy of `schema` in which every object schema with `properties` and no word on other keys
    (additionalProperties, patternProperties, unevaluatedProperties) gets additionalProperties: false."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: close_objects(v) for k, v in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(v) for v in out[key]]
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), (dict, list)):
            out[key] = close_objects(out[key]) if isinstance(out[key], dict) else [close_objects(v) for v in out[key]]
    if "properties" in out and not any(k in out for k in ("additionalProperties", "patternProperties",
                                                           "unevaluatedProperties")):
        out["additionalProperties"] = False
    return out


def schema_json(schema: Any) -> str:
    """A schema as compact JSON text (for grammars that inline it)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
