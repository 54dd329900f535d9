"""`lmforge eval perplexity`: how well a model predicts held-out text, with a sliding window over long text.

    lmforge eval perplexity --model runs/x/final --data notes.txt
    lmforge eval perplexity --model runs/x/final --data data/prepared          # its validation shards

Text longer than the model's context is scored in windows of `window` tokens that move by `stride` tokens. Each
token is scored once: a window's targets are only the tokens the previous window did not reach (the method of HF's
"Perplexity of fixed-length models" guide). stride = window scores (almost) disjoint chunks (fast, pessimistic:
early tokens of each chunk see little context; windows still overlap by one token, so each chunk's first token is
predicted from the token before it and none goes unscored); a smaller stride gives every token at least
window - stride tokens of context at the price of window/stride times more compute. The very first token has no
context and is never scored.

Input: a text file (.jsonl: each line's "text" field is a document), or a prepared data directory (data/shards.py
format), read through its memory-mapped shards, `--split val` by default. Each document of a text file ends with
EOS, as `lmforge prepare` writes them, so the text file and its prepared shards score the same, when EOS is a
document end (lmforge's and base models' tokenizers: <|end_of_text|>, </s>). A chat model's EOS is often its
end-of-turn token (SmolLM2, Qwen2 instruct: <|im_end|>): text never ends a turn, so scoring one after the text would
charge the model for a token that is not there (SmolLM2-135M-Instruct on 839 tokens of docs/eval.md: perplexity
64.8 without it, 66.0 with it). Then nothing is appended, and documents of a .jsonl are separated by the vocabulary's
document-end token (<|endoftext|>, <|end_of_text|>, </s>) when it has one.
Reports mean negative log-likelihood per token (nats), perplexity = exp(mean NLL), and bits per byte
(tokenizer-independent, so models with different tokenizers compare).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import opt
from lmforge.errors import LmforgeError


@dataclass
class PerplexityConfig:
    model: str = opt("", help="model directory (HF format, e.g. runs/NAME/final), a .gguf file or a packaged "
                     "model name")
    data: str = opt("", help="text file (.txt/.md, or .jsonl with a 'text' field) or a prepared data directory")
    split: str = opt("val", help="split of a prepared data directory to score")
    window: int | None = opt(None, help="tokens per forward pass (default: the model's context length)")
    stride: int | None = opt(None, help="tokens the window moves each step (default: window / 2)")
    max_tokens: int = opt(0, help="score only the first N tokens (0: all)")
    batch_size: int = opt(4, help="windows per forward pass")
    dtype: str = opt("float32", help="weights and activations dtype", choices=["float32", "bfloat16", "float16"])
    device: str = opt("cpu", help="torch device")
    json: bool = opt(False, help="print the result as JSON")
    out: str = opt("", help="also write the result as JSON to this file")


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) for each window over n_tokens: inputs ids[begin:end], targets are the tokens at
    positions first_target..end-1 (each token after the first is a target exactly once)."""
    if window < 2:
        raise LmforgeError(f"the window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise LmforgeError(f"the stride must be between 1 and the window ({window}), got {stride}")
    stride = min(stride, window - 1)  # windows overlap by at least one token, so no window's first token goes unscored
    out = []
    prev_end = 0
    begin = 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        first = max(prev_end, 1)  # token 0 has no context at all
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        begin += stride
    return out


def sliding_nll(model, ids, window: int, stride: int, batch_size: int = 4, device: str = "cpu",
                advance=None) -> tuple[float, int]:
    """(sum of -log p(token | window context) over scored tokens, number of scored tokens) for token ids `ids`."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    spans = windows(len(ids), window, stride)
    total, count = 0.0, 0
    # windows of equal length batch together (all but possibly the last)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for s in spans:
        groups.setdefault(s[1] - s[0], []).append(s)
    with torch.inference_mode():
        for group in groups.values():
            for b in range(0, len(group), batch_size):
                part = group[b:b + batch_size]
                x = torch.stack([ids[s:e] for s, e, _ in part]).to(device)  # B T
                logp = torch.log_softmax(model(x).float(), dim=-1)  # B T V
                for row, (s, e, first) in enumerate(part):
                    pos = torch.arange(first - s - 1, e - s - 1, device=device)  # positions predicting the targets
                    tgt = x[row, first - s:e - s]
                    total -= float(logp[row, pos, tgt].sum())
                    count += e - first
                if advance is not None:
                    advance(sum(e - f for _, e, f in part))
    return total, count


# What a tokenizer may call the end of a document when its EOS is a chat turn's end.
_DOCUMENT_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>")


def document_ends(tok) -> tuple[int | None, int | None]:
    """(id after every document, id between documents): EOS after each when it is a document end; when it is an
    end-of-turn token, nothing after and the vocabulary's document-end token (if any) between."""
    from lmforge.tokenizer.tokenizer import END_OF_TURN_TOKENS

    if tok.eos_id is not None and tok.eos_token not in END_OF_TURN_TOKENS:
        return tok.eos_id, None
    between = next((i for i in map(tok.token_to_id, _DOCUMENT_END_TOKENS) if i is not None), None)
    return None, between


def _read_text_tokens(path: Path, em) -> tuple[list[int], int]:
    """Token ids and UTF-8 byte count of a text file (documents of a .jsonl separated as document_ends says)."""
    tok = em.tokenizer
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text ({e})") from None
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{n} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise LmforgeError(f"{path}:{n} has no string \"text\" field")
            docs.append(rec["text"])
    else:
        docs = [raw]
    after, between = document_ends(tok)
    ids: list[int] = []
    for n, d in enumerate(docs):  # as `lmforge prepare` writes documents: the tokens, then EOS
        if n and between is not None:
            ids.append(between)
        ids += tok.encode(d, add_special_tokens=True)
        if after is not None:
            ids.append(after)
    return ids, sum(len(d.encode("utf-8")) for d in docs)


def _check_same_tokenizer(data_dir: Path, em) -> None:
    tdir = data_dir / "tokenizer"
    if not (tdir / "tokenizer.json").is_file():
        return
    from lmforge.checkpoint import load_tokenizer

    theirs = load_tokenizer(tdir)
    if theirs.backend.get_vocab() != em.tokenizer.backend.get_vocab():
        raise LmforgeError(f"{data_dir} was tokenized with a different tokenizer than {em.path}'s; perplexity over "
                           "other token ids is meaningless. Score a text file instead, or prepare the data with "
                           "this model's tokenizer")


def evaluate(cfg: PerplexityConfig, em=None) -> dict:
    """Run the perplexity evaluation and return the result dict (what --json prints)."""
    from lmforge.eval.lm import EvalModel
    from lmforge.eval.report import progress

    if not cfg.model:
        raise LmforgeError("say which model to score: --model DIR")
    if not cfg.data:
        raise LmforgeError("say what to score: --data FILE (text or .jsonl) or --data DIR (prepared token shards)")
    data = Path(cfg.data)
    if not data.exists():
        raise LmforgeError(f"{data} does not exist")
    em = em or EvalModel(cfg.model, cfg.dtype, cfg.device)
    if data.is_dir():
        from lmforge.data.shards import TokenShards

        shards = TokenShards(data, cfg.split)
        _check_same_tokenizer(data, em)
        n = len(shards) if cfg.max_tokens <= 0 else min(cfg.max_tokens, len(shards))
        ids = shards.read(0, n)
        n_bytes = shards.bytes * n / len(shards) if shards.bytes else None
        source = f"{data} ({cfg.split} split, {len(shards):,} tokens)"
    else:
        ids, n_bytes = _read_text_tokens(data, em)
        if cfg.max_tokens > 0 and len(ids) > cfg.max_tokens:
            n_bytes = n_bytes * cfg.max_tokens / len(ids)
            ids = ids[:cfg.max_tokens]
        source = str(data)
    if len(ids) < 2:
        raise LmforgeError(f"{data} holds {len(ids)} token(s); perplexity needs at least 2")
    if int(max(ids)) >= em.model.cfg.vocab_size:
        raise LmforgeError(f"{data} holds token id {int(max(ids))}, outside the model's vocabulary "
                           f"({em.model.cfg.vocab_size}); the data was tokenized for another model")
    window = min(cfg.window or em.max_len, em.max_len)
    stride = cfg.stride or max(1, window // 2)
    t0 = time.perf_counter()
    with progress(len(ids) - 1, "perplexity") as advance:
        nll, count = sliding_nll(em.model, ids, window, stride, cfg.batch_size, cfg.device, advance)
    seconds = time.perf_counter() - t0
    mean = nll / count
    forwarded = sum(e - b for b, e, _ in windows(len(ids), window, stride))
    return {"model": str(em.path), "data": source, "tokens": len(ids), "tokens_scored": count,
            "window": window, "stride": stride, "nll": mean, "perplexity": math.exp(min(mean, 700.0)),
            "bits_per_byte": (nll / math.log(2) / (n_bytes * count / (len(ids) - 1))) if n_bytes else None,
            "seconds": seconds, "tokens_per_s": forwarded / seconds if seconds > 0 else None}


def run(cfg: PerplexityConfig) -> int:
    from lmforge.eval.report import fmt, table, write_json

    r = evaluate(cfg)
    if cfg.out:
        write_json(r, cfg.out)
    if cfg.json:
        print(json.dumps(r, indent=1))
        return 0
    rows = [["perplexity", fmt(r["perplexity"], 3)], ["nll / token (nats)", fmt(r["nll"], 4)],
            ["bits / byte", fmt(r["bits_per_byte"], 4)], ["tokens scored", f"{r['tokens_scored']:,}"],
            ["window / stride", f"{r['window']} / {r['stride']}"], ["seconds", fmt(r["seconds"], 2)],
            ["tokens/s (forward)", fmt(r["tokens_per_s"], 0)]]
    print(f"{r['model']} on {r['data']}")
    print(table(["metric", "value"], rows))
    if cfg.out:
        print(f"wrote {cfg.out}", file=sys.stderr)
    return 0
