"""Scoring inside a finetuning run: per-token loss on the masked (assistant) tokens of held-out examples, the
log-probability a model gives each example's trained tokens (`example_logps` runs the model over examples;
losses.sequence_logps is the same sum over a batch's logits), and multiple-choice accuracy, so a run's report can
say how much better the finetuned model does than its base on examples it never trained on (the eval stage scores
the same held-out files independently).

Multiple choice is scored as lm-evaluation-harness scores it: each choice is rendered as the assistant's answer to
the question with the chat template, and its log-probability is summed over the answer's tokens (the same
tokens SFT trains on, end-of-turn included). `acc` takes the highest sum; `acc_norm` divides by the answer's length
in characters first, which removes the preference for short answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from lmforge.data.sft import Example, collate, encode_chat
from lmforge.finetune.losses import token_logps
from lmforge.tokenizer.tokenizer import Tokenizer


def forward_batch(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Logits [B, T, V] of a collated batch (packed rows use their positions and block mask)."""
    return model(batch["input_ids"], input_pos=batch["input_pos"], mask=batch["attn_mask"])


def _batches(n: int, size: int) -> Iterator[list[int]]:
    for s in range(0, n, size):
        yield list(range(s, min(n, s + size)))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def example_logps(model: torch.nn.Module, examples: list[Example], pad_id: int,
                   batch_size: int = 16) -> tuple[list[float], list[int]]:
    """Run the model over `examples` (in batches, eval mode): the summed log p of each one's trained tokens, and
    their counts."""
    was_training = model.training
    model.eval()
    dev = _device(model)
    sums: list[float] = []
    counts: list[int] = []
    try:
        for idx in _batches(len(examples), batch_size):
            batch = _to(collate(examples, [[i] for i in idx], pad_id), dev)
            lp = token_logps(forward_batch(model, batch), batch["targets"])
            m = batch["loss_mask"]
            sums += (lp * m).sum(-1).tolist()
            counts += m.sum(-1).tolist()
    finally:
        model.train(was_training)
    return sums, counts


def masked_loss(model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int = 16) -> float:
    """Mean negative log-likelihood per trained (assistant) token."""
    sums, counts = example_logps(model, examples, pad_id, batch_size)
    return -sum(sums) / max(1, sum(counts))


def mc_examples(tokenizer: Tokenizer, render: Callable, items: list[dict]) -> list[Example]:
    """One example per (item, choice): the question as the user's turn, the choice as the assistant's."""
    out = []
    for item in items:
        for choice in item["choices"]:
            out.append(encode_chat(tokenizer, render, [{"role": "user", "content": item["question"]},
                                                       {"role": "assistant", "content": choice}]))
    return out


def mc_accuracy(model: torch.nn.Module, tokenizer: Tokenizer, render: Callable, items: list[dict],
                batch_size: int = 16, examples: list[Example] | None = None) -> dict[str, float]:
    """{"acc", "acc_norm", "n"} over items {"question", "choices", "answer": index}."""
    examples = examples if examples is not None else mc_examples(tokenizer, render, items)
    sums, _ = example_logps(model, examples, tokenizer.pad_id or 0, batch_size)
    right = right_norm = 0
    k = 0
    for item in items:
        n = len(item["choices"])
        scores = sums[k:k + n]
        norm = [s / max(1, len(c)) for s, c in zip(scores, item["choices"])]
        right += max(range(n), key=scores.__getitem__) == item["answer"]
        right_norm += max(range(n), key=norm.__getitem__) == item["answer"]
        k += n
    total = max(1, len(items))
    return {"acc": right / total, "acc_norm": right_norm / total, "n": len(items)}


@torch.no_grad()
def pair_logps(model: torch.nn.Module, pairs: list, pad_id: int, average: bool = False,
               batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(chosen | prompt) and log p(rejected | prompt) for every pair (summed, or token-averaged): [N], [N]."""
    chosen, n_c = example_logps(model, [p.chosen for p in pairs], pad_id, batch_size)
    rejected, n_r = example_logps(model, [p.rejected for p in pairs], pad_id, batch_size)
    c, r = torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    if average:
        c = c / torch.tensor(n_c).clamp(min=1)
        r = r / torch.tensor(n_r).clamp(min=1)
    return c, r
