"""Validation during training: mean token loss, perplexity and bits per byte, plus a few sample generations.

Bits per byte (bpb) makes runs with different vocabularies comparable: the loss is in nats per token, and a
byte of text costs loss * tokens / (bytes * ln 2) bits. The data directory records each split's UTF-8 byte
count, so tokens_per_byte is that split's ratio; when the evaluation covers part of the split the ratio is
the split's average (exact when the whole split is evaluated).

Sampling here is deliberately small (training may not import lmforge.inference): one sequence at a time with
the model's KV cache, temperature and top-k, a private torch.Generator so the training RNG stream is untouched
(resume stays exact). The inference stage has the real engine.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch

from lmforge.data import IGNORE_INDEX
from lmforge.training.step import cross_entropy_sum


def bits_per_byte(loss: float, tokens_per_byte: float | None) -> float | None:
    """Bits per UTF-8 byte for a mean token loss in nats."""
    if tokens_per_byte is None or not math.isfinite(loss):
        return None
    return loss * tokens_per_byte / math.log(2)


def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             autocast_ctx=None, tokens_per_byte: float | None = None, reduce=None) -> dict:
    """Mean token loss over `batches` of (inputs, targets) on the model's device.

    reduce: optional function summing [loss_sum, tokens] over data-parallel ranks.
    Returns {"loss", "ppl", "bpb", "tokens"}. The model is put back in training mode afterwards.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast_ctx() if autocast_ctx else contextlib.nullcontext():
                logits = model(x)
            total += float(cross_entropy_sum(logits, y))
            count += int((y != IGNORE_INDEX).sum())
    if reduce is not None:
        total, count = reduce([total, float(count)])
    model.train(was_training)
    loss = total / count if count else float("nan")
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": bits_per_byte(loss, tokens_per_byte),
            "tokens": int(count)}


def sample(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = 50, seed: int = 0, stop_ids: Iterable[int] = ()) -> list[int]:
    """Generate up to max_new_tokens ids after `prompt` (returned without the prompt); stops at a stop id.

    temperature 0 is greedy. The context is cut to the model's max_seq_len. Runs in the weights' precision.
    """
    cfg = model.cfg
    device = next(model.parameters()).device
    stop = set(stop_ids)
    prompt = list(prompt)[-(cfg.max_seq_len - 1):] or [0]
    budget = min(max_new_tokens, cfg.max_seq_len - len(prompt))
    g = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[int] = []
    with torch.no_grad():
        cache = model.new_cache(1, len(prompt) + budget)
        logits = model(torch.tensor([prompt], device=device), input_pos=0, cache=cache)[:, -1]
        pos = len(prompt)
        for _ in range(budget):
            logits = logits.float()
            if temperature <= 0:
                nxt = int(logits.argmax(-1))
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
            if nxt in stop:
                break
            out.append(nxt)
            logits = model(torch.tensor([[nxt]], device=device), input_pos=pos, cache=cache)[:, -1]
            pos += 1
    model.train(was_training)
    return out
