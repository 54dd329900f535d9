"""Supervised finetuning data: JSONL records -> chat messages -> token ids with a loss mask -> padded or packed batches.

Record shapes (detected per line, or named with `fmt`):
  messages           {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}  (OpenAI; multi-turn;
                     an assistant turn with "weight": 0 is context only)
  alpaca             {"instruction", "input" (optional), "output", "system" (optional)}
  sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
  prompt_completion  {"prompt", "completion"}: strings (a user turn and an assistant turn) or message lists
Preference records ({"prompt", "chosen", "rejected"}) belong to data/preference.py and are refused here by name.

Rendering and the assistant mask. The conversation is rendered with the model's own chat template (as transformers
renders it) and tokenized once, whole, with character offsets: the ids are exactly apply_chat_template's. The loss
covers the tokens of each assistant turn's content plus the template's end-of-turn text (<|im_end|>, <|eot_id|>,
</s>: a model that never trains on it never learns to stop), and nothing of the prompt or the role headers. The
character spans of assistant text are found in this order:
  1. the template's own `{% generation %}` marks (transformers' convention) when it has them: exact by definition;
  2. sentinel markers: every assistant content is wrapped in private-use-codepoint markers, the conversation is
     rendered once more, and the markers give the spans. The rendering with markers removed must equal the real
     rendering character for character, or the method is refused (a template that edits content, e.g. `| trim`).
     The end-of-turn text is what the template writes after the content when the conversation ends on that turn,
     cut at trailing whitespace and kept only as far as the real rendering agrees. This works for templates whose
     earlier text depends on later turns (Mistral v0.3 puts the system prompt into the last user turn), where
  3. prefix rendering fails; it is the last resort: the span of turn i is render(messages[:i+1]) minus
     render(messages[:i], add_generation_prompt=True), valid only if both are prefixes of the full rendering.
If none applies, or an example has assistant turns but the template leaves no assistant token (a template that drops
them), that is an error naming the record, never an all-zero mask that trains on nothing. Sentinels first, because
they check themselves against the real rendering and need no property of the template beyond copying content.
A token is trained on when its last character lies in an assistant span (tokens straddling a boundary are rare:
headers end in special tokens or newlines, which the pre-tokenizers split on).

Examples longer than the context keep their first seq_len + 1 tokens and are counted; those left with no trainable
token are dropped and counted. Packing puts several short examples in one row with per-example positions and a
block-diagonal causal mask (the model's `input_pos`/`mask` arguments), so examples never attend to each other and
no target crosses an example boundary.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.tokenizer import chat
from lmforge.tokenizer.tokenizer import Tokenizer

SFT_FORMATS = ("auto", "messages", "alpaca", "sharegpt", "prompt_completion")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                   "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}

# Private-use code points around each assistant content while locating it (unlikely in data; checked anyway).
_MARK = re.compile("\ue000lmf([se])(\\d+)\ue001")


def _marker(kind: str, i: int) -> str:
    return f"\ue000lmf{kind}{i}\ue001"


class RecordError(ValueError):
    """A record that is not in any supported shape; the reader adds file and line."""


# ---- records -> messages -----------------------------------------------------------------------------------
def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    raise RecordError(f"unrecognised record with keys {sorted(record)[:8]}; expected 'messages', 'conversations', "
                      "'instruction'+'output' or 'prompt'+'completion'")


def _check_messages(messages: Any, what: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"'{what}' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RecordError(f"'{what}'[{j}] must be an object with a string 'role'")
        c = m.get("content")
        if c is None and m.get("role") == "assistant" and m.get("tool_calls"):
            pass
        elif not isinstance(c, (str, list)):
            raise RecordError(f"'{what}'[{j}] ({m['role']}) needs 'content' as a string or a list of parts")
        if "weight" in m and m["weight"] not in (0, 1):
            raise RecordError(f"'{what}'[{j}] has weight {m['weight']!r}; a weight is 0 (do not train on this "
                              "turn) or 1")
        out.append(dict(m))
    return out


def as_messages(value: Any, role: str, what: str) -> list[dict]:
    """A string becomes one message of `role`; a message list is checked and returned."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _check_messages(value, what)


def to_messages(record: Any, fmt: str = "auto") -> list[dict]:
    """The chat messages of one SFT record (raises RecordError with what is wrong)."""
    if not isinstance(record, dict):
        raise RecordError(f"each line must be a JSON object, got {type(record).__name__}")
    kind = detect_format(record) if fmt == "auto" else fmt
    if kind == "messages":
        return _check_messages(record.get("messages"))
    if kind == "alpaca":
        ins, inp, out = record.get("instruction"), record.get("input") or "", record.get("output")
        if not isinstance(ins, str) or not isinstance(out, str) or not isinstance(inp, str):
            raise RecordError("alpaca records need string 'instruction' and 'output' (and optional string 'input')")
        msgs = [{"role": "system", "content": record["system"]}] if isinstance(record.get("system"), str) else []
        msgs.append({"role": "user", "content": f"{ins}\n\n{inp}" if inp else ins})
        msgs.append({"role": "assistant", "content": out})
        return msgs
    if kind == "sharegpt":
        conv = record.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise RecordError("'conversations' must be a non-empty list of {'from', 'value'} objects")
        msgs = []
        for j, turn in enumerate(conv):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise RecordError(f"'conversations'[{j}] must be an object with a string 'value'")
            who = str(turn.get("from", "")).lower()
            if who not in _SHAREGPT_ROLES:
                raise RecordError(f"'conversations'[{j}] has unknown 'from' {turn.get('from')!r} "
                                  f"(known: {', '.join(sorted(_SHAREGPT_ROLES))})")
            msgs.append({"role": _SHAREGPT_ROLES[who], "content": turn["value"]})
        if isinstance(record.get("system"), str) and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": record["system"]})
        return msgs
    if kind == "prompt_completion":
        if "prompt" not in record or "completion" not in record:
            raise RecordError("prompt_completion records need 'prompt' and 'completion'")
        return as_messages(record["prompt"], "user", "prompt") + as_messages(record["completion"], "assistant",
                                                                                 "completion")
    if kind == "preference":
        raise RecordError("this is a preference record (prompt/chosen/rejected); train on it with "
                          "`lmforge finetune dpo`")
    raise RecordError(f"unknown format {kind!r}; choose one of: {', '.join(SFT_FORMATS)}")


# ---- JSONL reading ---------------------------------------------------------------------------------------
def jsonl_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.jsonl") if f.is_file())
        if not files:
            raise LmforgeError(f"{p} holds no .jsonl files; give a JSONL file or a directory of them")
        return files
    if not p.is_file():
        raise LmforgeError(f"data file {p} does not exist (give a .jsonl file, a directory of them, or 'builtin')")
    return [p]


@dataclass
class ReadStats:
    """What reading and rendering did to the data; the recipes log it."""

    records: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    dropped_empty: int = 0  # nothing left to train on after truncation
    tokens: int = 0
    train_tokens: int = 0
    bad_examples: list[str] = field(default_factory=list)  # first few "file:line: why"

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "bad_examples"}


def read_jsonl(path: str | Path, parse: Callable[[Any], Any], skip_bad: bool = False,
               stats: ReadStats | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ("file:line", parse(record)) for every non-blank line. A bad line is an error naming the file and line,
    or with skip_bad is skipped and counted in stats."""
    stats = stats if stats is not None else ReadStats()
    for f in jsonl_files(path):
        with open(f, encoding="utf-8", errors="strict") as fh:
            try:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    where = f"{f}:{n}"
                    try:
                        item = parse(json.loads(line))
                    except (json.JSONDecodeError, RecordError) as e:
                        why = f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                        if not skip_bad:
                            raise LmforgeError(f"{f} line {n}: {why}. Fix the line, or pass --skip-bad to skip "
                                               "malformed lines (they are counted)") from None
                        stats.skipped_bad += 1
                        if len(stats.bad_examples) < 5:
                            stats.bad_examples.append(f"{where}: {why}")
                        continue
                    stats.records += 1
                    yield where, item
            except UnicodeDecodeError as e:
                raise LmforgeError(f"{f} is not UTF-8 text ({e}); convert it to UTF-8") from None


# ---- rendering with the assistant mask ------------------------------------------------------------------
def chat_renderer(tokenizer: Tokenizer, template: str | None = None) -> Callable[..., str]:
    """render(messages, add_generation_prompt=False) with the tokenizer's template and special tokens."""
    template = template or tokenizer.chat_template or chat.DEFAULT_CHAT_TEMPLATE
    variables = dict(tokenizer.special_tokens)
    bos, eos = variables.pop("bos_token", None), variables.pop("eos_token", None)

    def render(messages: list[dict], add_generation_prompt: bool = False, spans: bool = False) -> Any:
        if spans:
            return chat.render_with_spans(template, messages, add_generation_prompt, bos, eos, **variables)
        return chat.render(template, messages, add_generation_prompt, bos, eos, **variables)

    render.template = template  # type: ignore[attr-defined]
    return render


def _wrap_content(message: dict, i: int) -> dict:
    s, e = _marker("s", i), _marker("e", i)
    m = dict(message)
    c = m.get("content")
    if isinstance(c, str):
        m["content"] = s + c + e
    elif isinstance(c, list):
        texts = [k for k, p in enumerate(c) if isinstance(p, dict) and p.get("type") == "text"]
        if not texts:
            return m
        parts = [dict(p) for p in c]
        parts[texts[0]]["text"] = s + parts[texts[0]]["text"]
        parts[texts[-1]]["text"] = parts[texts[-1]]["text"] + e
        m["content"] = parts
    return m


def _strip_markers(text: str) -> tuple[str, dict[tuple[str, int], int]]:
    """Text without markers, and each marker's position in that text."""
    out, where, last, removed = [], {}, 0, 0
    for m in _MARK.finditer(text):
        out.append(text[last:m.start()])
        where[(m.group(1), int(m.group(2)))] = m.start() - removed
        removed += m.end() - m.start()
        last = m.end()
    out.append(text[last:])
    return "".join(out), where


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _spans_by_sentinels(render: Callable, messages: list[dict], full: str,
                        turns: list[int]) -> list[tuple[int, int]] | None:
    marked = [(_wrap_content(m, i) if i in turns else m) for i, m in enumerate(messages)]
    try:
        whole = render(marked)
    except LmforgeError:  # the template inspects content and rejects the markers
        return None
    text, where = _strip_markers(whole)
    if text != full:
        return None  # the template changed the content (trim, escaping...): markers would lie
    spans = []
    for i in turns:
        if ("s", i) not in where or ("e", i) not in where:
            continue  # the template does not render this turn
        start, end = where[("s", i)], where[("e", i)]
        if end < start:
            return None
        try:  # what the template writes after this turn's content when the conversation ends there
            q, qwhere = _strip_markers(whole if i == len(marked) - 1 else render(marked[:i + 1]))
            tail = q[qwhere[("e", i)]:].rstrip() if ("e", i) in qwhere else ""
        except LmforgeError:
            tail = ""
        spans.append((start, end + _common_prefix(tail, full[end:])))
    return spans


def _spans_by_prefixes(render: Callable, messages: list[dict], full: str,
                       turns: list[int]) -> list[tuple[int, int]] | None:
    spans = []
    for i in turns:
        p = render(messages[:i], add_generation_prompt=True) if i > 0 else ""
        q = render(messages[:i + 1]).rstrip()
        if not (full.startswith(p) and full.startswith(q) and len(q) >= len(p)):
            return None
        spans.append((len(p), len(q)))
    return spans


def assistant_spans(render: Callable, messages: list[dict], train_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of assistant turns at index >= train_from."""
    full = render(messages)
    # OpenAI's multi-turn format: an assistant message with "weight": 0 is context, not a target
    turns = [i for i, m in enumerate(messages)
             if m.get("role") == "assistant" and i >= train_from and m.get("weight", 1) != 0]
    if not turns:
        return full, []
    weighted = any("weight" in m for m in messages)
    if (not weighted and "generation" in render.template
            and re.search(r"{%-?\s*generation\s*-?%}", render.template)):
        text, spans = render(messages, spans=True)
        if spans and train_from == 0:
            return text, spans
    spans = _spans_by_sentinels(render, messages, full, turns)
    if spans is None:
        spans = _spans_by_prefixes(render, messages, full, turns)
    if spans is None:
        raise RecordError("cannot locate the assistant turns in this chat template's output (it edits assistant "
                          "text and renders earlier turns differently as the conversation grows); add "
                          "{% generation %}...{% endgeneration %} around assistant content in the template, or "
                          "train on every token with --train-on-all")
    return full, spans


@dataclass
class Example:
    """One tokenized conversation: ids and, per token, whether the loss covers it (predicting it)."""

    ids: list[int]
    train: list[bool]
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)


def encode_chat(tokenizer: Tokenizer, render: Callable, messages: list[dict], *, train_on_all: bool = False,
                train_from: int = 0) -> Example:
    """Render and tokenize one conversation with its loss mask (see the module docstring)."""
    if train_on_all:
        text = render(messages)
        ids = tokenizer.backend.encode(text, add_special_tokens=False).ids
        return Example(ids, [True] * len(ids))
    text, spans = assistant_spans(render, messages, train_from)
    if not any(m.get("role") == "assistant" for m in messages[train_from:]):
        raise RecordError("the conversation has no assistant turn to learn from (pass --train-on-all to train on "
                          "every token)")
    inside = bytearray(len(text))
    for s, e in spans:
        inside[s:e] = b"\x01" * (e - s)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    train = []
    for s, e in enc.offsets:
        c = e - 1 if e > s else s
        train.append(0 <= c < len(text) and bool(inside[c]))
    if not any(train):
        raise RecordError("the chat template leaves no assistant token to train on (it does not render the "
                          "assistant turns); fix the template or pass --train-on-all")
    return Example(list(enc.ids), train)


def truncate(ex: Example, max_tokens: int) -> tuple[Example, bool]:
    if len(ex.ids) <= max_tokens:
        return ex, False
    return Example(ex.ids[:max_tokens], ex.train[:max_tokens], ex.source), True


def load_sft(path: str | Path, tokenizer: Tokenizer, seq_len: int, fmt: str = "auto", *,
             train_on_all: bool = False, skip_bad: bool = False, template: str | None = None,
             records: list[tuple[str, Any]] | None = None) -> tuple[list[Example], ReadStats]:
    """Read, render, tokenize and truncate an SFT file (or the given (source, record) pairs)."""
    if fmt not in SFT_FORMATS:
        raise LmforgeError(f"unknown SFT data format {fmt!r}; choose one of: {', '.join(SFT_FORMATS)}")
    render = chat_renderer(tokenizer, template)
    stats = ReadStats()

    def parse(record: Any) -> Example:
        messages = to_messages(record, fmt)
        try:
            return encode_chat(tokenizer, render, messages, train_on_all=train_on_all)
        except LmforgeError as e:  # the template refused these messages (e.g. roles must alternate)
            raise RecordError(str(e)) from None

    source = ((w, parse(r)) for w, r in records) if records is not None else read_jsonl(path, parse, skip_bad, stats)
    out = []
    try:
        for where, ex in source:
            if records is not None:
                stats.records += 1
            ex.source = where
            ex, cut = truncate(ex, seq_len + 1)  # seq_len inputs predict seq_len targets
            stats.truncated += cut
            n_train = sum(ex.train[1:])
            if n_train == 0:
                stats.dropped_empty += 1
                continue
            stats.tokens += len(ex.ids)
            stats.train_tokens += n_train
            out.append(ex)
    except RecordError as e:  # only from in-memory records (files name their line in read_jsonl)
        raise LmforgeError(f"built-in data record: {e}") from None
    if not out:
        raise LmforgeError(f"{path}: no example has a token to train on "
                           f"({stats.records} read, {stats.skipped_bad} skipped as malformed, "
                           f"{stats.dropped_empty} truncated to nothing at seq_len {seq_len})")
    return out, stats


# ---- batching ------------------------------------------------------------------------------------------
def plan_rows(lengths: list[int], seq_len: int, pack: bool, seed: int, epoch: int) -> list[list[int]]:
    """Rows of example indices for one epoch, in a seeded order. Without packing each row is one example;
    with packing, examples (each contributing len-1 input positions) are placed first-fit into rows of seq_len."""
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if not pack:
        return [[i] for i in order]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        need = lengths[i] - 1
        for r, free in enumerate(room[-64:], start=max(0, len(room) - 64)):  # first fit among recent rows
            if free >= need:
                rows[r].append(i)
                room[r] -= need
                break
        else:
            rows.append([i])
            room.append(seq_len - need)
    return rows


def collate(examples: list[Example], rows: list[list[int]], pad_id: int) -> dict[str, Any]:
    """Tensors for a micro-batch of rows: input_ids, targets (IGNORE_INDEX where untrained), loss_mask [B, T];
    for rows holding several examples,
    also input_pos [B, T] (positions restart per example) and attn_mask [B, 1, T, T] (block-diagonal causal)."""
    import torch

    pieces = [[(examples[i].ids, examples[i].train) for i in row] for row in rows]
    T = max(sum(len(ids) - 1 for ids, _ in row) for row in pieces)
    B = len(rows)
    inp = torch.full((B, T), pad_id, dtype=torch.long)
    tgt = torch.full((B, T), pad_id, dtype=torch.long)
    lm = torch.zeros((B, T), dtype=torch.bool)
    packed = any(len(r) > 1 for r in rows)
    pos = torch.zeros((B, T), dtype=torch.long) if packed else None
    doc = torch.full((B, T), -1, dtype=torch.long) if packed else None
    for b, row in enumerate(pieces):
        t = 0
        for d, (ids, train) in enumerate(row):
            n = len(ids) - 1
            inp[b, t:t + n] = torch.tensor(ids[:-1])
            tgt[b, t:t + n] = torch.tensor(ids[1:])
            lm[b, t:t + n] = torch.tensor(train[1:])
            if packed:
                pos[b, t:t + n] = torch.arange(n)
                doc[b, t:t + n] = d
            t += n
    tgt = tgt.masked_fill(~lm, IGNORE_INDEX)  # untrained targets carry the ignore index cross-entropy skips
    out: dict[str, Any] = {"input_ids": inp, "targets": tgt, "loss_mask": lm, "input_pos": None, "attn_mask": None}
    if packed:
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = doc[:, :, None] == doc[:, None, :]  # B T T
        pad = doc < 0
        # a padding query attends to itself only (an all-False row would make attention NaN)
        eye = torch.eye(T, dtype=torch.bool)[None] & pad[:, :, None]
        out["attn_mask"] = ((same & causal[None] & ~pad[:, :, None]) | eye)[:, None]
        out["input_pos"] = pos
    return out


class ExampleLoader:
    """Micro-batches of rows (lists of example indices) over seeded, per-epoch reshuffled (and packed) plans.

    Its position is (epoch, cursor into that epoch's rows), so resuming replays exactly the rows an uninterrupted
    run would have seen. A micro-batch never spans two epochs' plans: it ends an epoch short rather than mixing.
    """

    def __init__(self, lengths: list[int], seq_len: int, batch_size: int, pack: bool = False, seed: int = 0):
        if not lengths:
            raise LmforgeError("no examples to train on")
        self.lengths, self.seq_len, self.batch_size = list(lengths), seq_len, batch_size
        self.pack, self.seed = pack, seed
        self.epoch, self.cursor = 0, 0
        self._plan: list[list[int]] | None = None
        self._plan_epoch = -1

    def rows(self, epoch: int) -> list[list[int]]:
        if epoch != self._plan_epoch:
            self._plan = plan_rows(self.lengths, self.seq_len, self.pack, self.seed, epoch)
            self._plan_epoch = epoch
        return self._plan  # type: ignore[return-value]

    @property
    def rows_per_epoch(self) -> int:
        return len(self.rows(0))

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.cursor / max(1, len(self.rows(self.epoch)))

    def next_rows(self) -> list[list[int]]:
        plan = self.rows(self.epoch)
        if self.cursor >= len(plan):
            self.epoch, self.cursor = self.epoch + 1, 0
            plan = self.rows(self.epoch)
        out = plan[self.cursor:self.cursor + self.batch_size]
        self.cursor += len(out)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "pack": self.pack,
                "n_examples": len(self.lengths)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("n_examples") != len(self.lengths) or \
                state.get("pack") != self.pack:
            raise LmforgeError("the checkpoint's data position was made with another seed, data or --pack setting; "
                               "use the same ones to resume, or start a new run directory")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
