"""Preference data: pairs for DPO ({"prompt", "chosen", "rejected"} records -> two tokenized conversations whose loss
masks cover only the responses), and unpaired ratings for KTO ({"prompt", "completion", "label": bool}, TRL's
format, -> one conversation each, plus the mismatched prompt/completion pairs KTO's KL estimate needs).

Accepted shapes (per line):
  {"prompt": "text", "chosen": "text", "rejected": "text"}                  a user turn and two assistant answers
  {"prompt": [messages], "chosen": [messages] | "text", "rejected": ...}      multi-turn history, then the answers
  {"chosen": [full conversation], "rejected": [full conversation]}           (Anthropic HH style) the prompt is
                                                                               the messages both share
  {"input": {"messages": [...]}, "preferred_output": [messages],              OpenAI's DPO fine-tuning format
   "non_preferred_output": [messages]}
A chosen/rejected list that repeats the prompt messages at its start is accepted too (the repeat is dropped).
Rendering, masks and truncation are data/sft.py's: the same chat template, the same assistant-span location,
so a response's log-probability is measured on exactly the tokens SFT would train on. A pair is dropped (and
counted) when truncation to the context leaves either response without a token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.sft import (
    Example,
    ReadStats,
    RecordError,
    as_messages,
    chat_renderer,
    encode_chat,
    read_jsonl,
    truncate,
)
from lmforge.errors import LmforgeError
from lmforge.tokenizer.tokenizer import Tokenizer


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    source: str = ""


def openai_input(record: dict) -> list[dict]:
    """The prompt messages of an OpenAI-format record's `input` ({"messages": [...]}, tools ignored)."""
    inp = record.get("input")
    if not isinstance(inp, dict) or "messages" not in inp:
        raise RecordError("'input' must be an object with 'messages' (the conversation so far)")
    return as_messages(inp["messages"], "user", "input.messages")


def to_preference(record: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen response messages, rejected response messages) of one record."""
    if not isinstance(record, dict):
        raise RecordError(f"each line must be a JSON object, got {type(record).__name__}")
    if "preferred_output" in record or "non_preferred_output" in record:
        for k in ("preferred_output", "non_preferred_output"):
            if k not in record:
                raise RecordError(f"OpenAI DPO records need 'input', 'preferred_output' and 'non_preferred_output'; "
                                  f"'{k}' is missing")
        record = {"prompt": openai_input(record), "chosen": record["preferred_output"],
                  "rejected": record["non_preferred_output"]}
    if "chosen" not in record or "rejected" not in record:
        raise RecordError(f"preference records need 'chosen' and 'rejected' (and usually 'prompt'); got keys "
                          f"{sorted(record)[:8]}")
    if "prompt" in record and record["prompt"] not in (None, "", []):
        prompt = as_messages(record["prompt"], "user", "prompt")
        chosen = as_messages(record["chosen"], "assistant", "chosen")
        rejected = as_messages(record["rejected"], "assistant", "rejected")
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
            chosen, rejected = chosen[n:], rejected[n:]
    else:
        if not isinstance(record["chosen"], list) or not isinstance(record["rejected"], list):
            raise RecordError("without 'prompt', 'chosen' and 'rejected' must be full conversations (message lists)")
        c = as_messages(record["chosen"], "assistant", "chosen")
        r = as_messages(record["rejected"], "assistant", "rejected")
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        if n == 0:
            raise RecordError("'chosen' and 'rejected' share no prompt messages; add a 'prompt' field")
        prompt, chosen, rejected = c[:n], c[n:], r[n:]
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        if not resp or not any(m["role"] == "assistant" for m in resp):
            raise RecordError(f"'{name}' holds no assistant response after the prompt")
    if chosen == rejected:
        raise RecordError("'chosen' and 'rejected' are identical: nothing to prefer")
    return prompt, chosen, rejected


def to_unpaired(record: Any) -> tuple[list[dict], list[dict], bool]:
    """(prompt messages, completion messages, desirable?) of one unpaired (KTO) record: TRL's
    {"prompt", "completion", "label": true|false}, strings or message lists."""
    if not isinstance(record, dict):
        raise RecordError(f"each line must be a JSON object, got {type(record).__name__}")
    missing = [k for k in ("prompt", "completion", "label") if k not in record]
    if missing:
        raise RecordError(f"unpaired (KTO) records need 'prompt', 'completion' and 'label'; missing "
                          f"{', '.join(repr(k) for k in missing)}")
    if not isinstance(record["label"], bool):
        raise RecordError(f"'label' must be true (a desirable completion) or false (undesirable), got "
                          f"{record['label']!r}")
    prompt = as_messages(record["prompt"], "user", "prompt")
    completion = as_messages(record["completion"], "assistant", "completion")
    if not any(m["role"] == "assistant" for m in completion):
        raise RecordError("'completion' holds no assistant message")
    return prompt, completion, record["label"]


def load_preferences(path: str | Path, tokenizer: Tokenizer, seq_len: int, *, skip_bad: bool = False,
                     template: str | None = None,
                     records: list[tuple[str, Any]] | None = None) -> tuple[list[Pair], ReadStats]:
    """Read, render and tokenize preference pairs (from a JSONL file/dir, or the given (source, record) pairs)."""
    render = chat_renderer(tokenizer, template)
    stats = ReadStats()

    def parse(record: Any) -> Pair:
        prompt, chosen, rejected = to_preference(record)
        try:
            return Pair(encode_chat(tokenizer, render, prompt + chosen, train_from=len(prompt)),
                        encode_chat(tokenizer, render, prompt + rejected, train_from=len(prompt)))
        except LmforgeError as e:
            raise RecordError(str(e)) from None

    if records is not None:
        def gen():
            for where, r in records:
                try:
                    yield where, parse(r)
                except RecordError as e:
                    raise LmforgeError(f"{where}: {e}") from None
        source = gen()
    else:
        source = read_jsonl(path, parse, skip_bad, stats)
    out = []
    for where, pair in source:
        if records is not None:
            stats.records += 1
        c, cut_c = truncate(pair.chosen, seq_len + 1)
        r, cut_r = truncate(pair.rejected, seq_len + 1)
        stats.truncated += cut_c or cut_r
        if not any(c.train[1:]) or not any(r.train[1:]):
            stats.dropped_empty += 1
            continue
        stats.tokens += len(c) + len(r)
        stats.train_tokens += sum(c.train[1:]) + sum(r.train[1:])
        out.append(Pair(c, r, where))
    if not out:
        raise LmforgeError(f"{path}: no preference pair has a response to score ({stats.records} read, "
                           f"{stats.skipped_bad} skipped as malformed, {stats.dropped_empty} truncated to nothing "
                           f"at seq_len {seq_len})")
    return out, stats


def pair_examples(pairs: list[Pair], idx: list[int]) -> tuple[list[Example], list[list[int]]]:
    """The examples and rows for one forward over a batch of pairs: rows 0..n-1 chosen, n..2n-1 rejected."""
    examples = [pairs[i].chosen for i in idx] + [pairs[i].rejected for i in idx]
    return examples, [[k] for k in range(len(examples))]


@dataclass
class Unpaired:
    """One rated completion (KTO): prompt + completion tokenized with the loss mask on the completion, whether it
    is desirable, and the messages (the KL estimate pairs a prompt with another record's completion)."""

    example: Example
    desirable: bool
    prompt: list[dict]
    completion: list[dict]
    source: str = ""


def load_unpaired(path: str | Path, tokenizer: Tokenizer, seq_len: int, *, skip_bad: bool = False,
                  template: str | None = None,
                  records: list[tuple[str, Any]] | None = None) -> tuple[list[Unpaired], ReadStats]:
    """Read, render and tokenize unpaired (KTO) records: {"prompt", "completion", "label"} (see to_unpaired)."""
    render = chat_renderer(tokenizer, template)
    stats = ReadStats()

    def parse(record: Any) -> Unpaired:
        prompt, completion, label = to_unpaired(record)
        try:
            ex = encode_chat(tokenizer, render, prompt + completion, train_from=len(prompt))
        except LmforgeError as e:
            raise RecordError(str(e)) from None
        return Unpaired(ex, label, prompt, completion)

    if records is not None:
        def gen():
            for where, r in records:
                try:
                    yield where, parse(r)
                except RecordError as e:
                    raise LmforgeError(f"{where}: {e}") from None
        source = gen()
    else:
        source = read_jsonl(path, parse, skip_bad, stats)
    out = []
    for where, item in source:
        if records is not None:
            stats.records += 1
        ex, cut = truncate(item.example, seq_len + 1)
        stats.truncated += cut
        if not any(ex.train[1:]):
            stats.dropped_empty += 1
            continue
        stats.tokens += len(ex)
        stats.train_tokens += sum(ex.train[1:])
        out.append(Unpaired(Example(ex.ids, ex.train, where), item.desirable, item.prompt, item.completion, where))
    if not out:
        raise LmforgeError(f"{path}: no record has a completion to score ({stats.records} read, {stats.skipped_bad} "
                           f"skipped as malformed, {stats.dropped_empty} truncated to nothing at seq_len {seq_len})")
    return out, stats


def mismatched(tokenizer: Tokenizer, render: Any, items: list[Unpaired], idx: list[int], seq_len: int) -> list[Example]:
    """KTO's KL pairs for a batch idx: prompt of idx[k] with the completion of idx[k - 1] (TRL's offset of one), so
    no prompt meets its own completion when the batch holds two or more records."""
    out = []
    for k, i in enumerate(idx):
        j = idx[k - 1]
        ex = encode_chat(tokenizer, render, items[i].prompt + items[j].completion, train_from=len(items[i].prompt))
        out.append(truncate(ex, seq_len + 1)[0])
    return out
