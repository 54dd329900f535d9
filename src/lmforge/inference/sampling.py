"""Per-request sampling: parameters, logits processors and the draw, as pure functions over a batch of rows.

Owns: `SamplingParams` (what one request asks for, validated), `SamplingOptions` (the same choices as the
`sampling` config section that `generate` and `chat` embed, with flat flags: --temperature, --top-k, --top-p,
--min-p, --repetition-penalty, --seed; each verb sets its own defaults), the logits processors (repetition /
presence / frequency penalties, temperature, top-k, top-p, min-p), the draw with a per-request random
stream, and log-probabilities. Leaves to others: stop *strings* (text level, generate.py), when a
sequence ends (engine.py), and HTTP parameter names (serve/schemas.py).

Decisions, after HF transformers, vLLM and llama.cpp:
- temperature 0 means greedy (argmax); greedy rows never touch a random stream. So does any temperature below
  GREEDY_BELOW (1e-5, vLLM's threshold): logits / 1e-39 overflow float32 to inf and softmax turns them into
  NaN (which drew the last vocabulary id every step), and such a temperature means "argmax" anyway. Above it,
  logits / temperature overflows only for logits beyond 1e33.
- repetition_penalty is CTRL's (Keskar et al. 2019) as HF applies it: over prompt and output tokens,
  positive logits are divided by it and negative ones multiplied. presence/frequency penalties are
  OpenAI's: over *generated* tokens only, logit -= frequency * count + presence * (count > 0).
- Order: penalties -> temperature -> top-k -> top-p -> min-p -> draw (vLLM's order).
- The draw is inverse-CDF sampling with one uniform number per row from that request's own
  `random.Random(seed)`, so a seeded request gives the same tokens alone or in any batch, and the only
  per-row Python work is one float. Rows without a seed draw from the engine's shared stream.
- logprobs are of the model's raw distribution (log_softmax of the logits before any processing), as vLLM
  reports them by default; the chosen token's logprob plus the `top_logprobs` most likely alternatives.
  `prompt_logprobs` (vLLM's name) asks the same for every prompt token (the engine computes them only then);
  `max_tokens=0` generates nothing, which with prompt_logprobs scores a text.
- validate() checks each value's type as well as its range (an int that is a bool, a float that is NaN or
  a number too large for a tensor are refused), so a request cannot carry a value the sampler would choke on;
  a top_k above the vocabulary is the same as off.
- A grammar's mask (constrain.py) comes first of all: disallowed ids get -inf, then the order above.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.config import opt
from lmforge.errors import LmforgeError

GREEDY_BELOW = 1e-5  # temperatures under this sample as greedy (see the module docstring)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)  # added to the model's EOS ids
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: Any = None  # a constrain.Grammar: only the tokens it allows may be sampled (None = free)
    prompt_logprobs: int | None = None  # None = off; k >= 0: each prompt token's logprob and k alternatives

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise LmforgeError naming the first value out of range or of the wrong type; return self."""
        ints = ("max_tokens", "top_k", "top_logprobs")
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        for name in ints:
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool)) or abs(v) >= 2**62:
                raise LmforgeError(f"{name} must be an integer, got {v!r}")
        for name in floats:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise LmforgeError(f"{name} must be a finite number, got {v!r}")
        for name in ("seed", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool)):
                raise LmforgeError(f"{name} must be an integer or None, got {v!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise LmforgeError(f"stop_token_ids must be integers, got {self.stop_token_ids!r}")
        checks = [
            ("max_tokens", self.max_tokens >= 0, "0 (score the prompt only) or more"),
            ("temperature", 0.0 <= self.temperature <= 100.0 and math.isfinite(self.temperature), "in [0, 100]"),
            ("top_k", self.top_k >= 0, "0 (off) or positive"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 100.0, "in (0, 100]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "None or in [0, 20]"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise LmforgeError(f"{name} must be {what}, got {getattr(self, name)!r}")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise LmforgeError(f"stop_token_ids {bad} are outside the vocabulary (0..{vocab_size - 1})")
        return self

    def replace(self, **kw) -> SamplingParams:
        return dataclasses.replace(self, **kw)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class SamplingOptions:
    """How a command-line verb samples (its `sampling` section). `params()` gives the engine's SamplingParams."""

    temperature: float = opt(0.8, "sampling temperature; 0 = greedy", flag="--temperature")
    top_k: int = opt(0, "keep only the k most likely tokens (0 = off)", flag="--top-k")
    top_p: float = opt(0.95, "nucleus sampling mass (1 = off)", flag="--top-p")
    min_p: float = opt(0.0, "drop tokens below min_p x the top probability (0 = off)", flag="--min-p")
    repetition_penalty: float = opt(1.0, "CTRL-style repetition penalty (1 = off)", flag="--repetition-penalty")
    seed: int | None = opt(None, "random seed for sampling (none = fresh each run)", flag="--seed")

    def params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              seed=self.seed)


class PenaltyState:
    """Per-request token statistics the penalties need: which ids were seen (prompt + output), output counts."""

    def __init__(self, vocab_size: int, prompt_ids: list[int], device=None):
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if prompt_ids:
            self.seen[torch.tensor(prompt_ids, device=device)] = True
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def update(self, token: int) -> None:
        self.seen[token] = True
        self.counts[token] += 1


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], states: list[PenaltyState]) -> torch.Tensor:
    """logits [R, V] float32 for R rows that all need penalties -> penalised logits [R, V]."""
    seen = torch.stack([s.seen for s in states])  # R V
    counts = torch.stack([s.counts for s in states])  # R V
    dev = logits.device
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - freq * counts - pres * (counts > 0).float()


def filter_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p over rows with temperature > 0: logits [R, V] -> probs [R, V].

    The result is unnormalised where tokens were removed (they get probability 0); the draw normalises.
    """
    dev = logits.device
    V = logits.shape[-1]
    temp = torch.tensor([p.temperature for p in params], device=dev, dtype=logits.dtype)[:, None]
    probs = torch.softmax(logits / temp, dim=-1)  # R V; temp >= GREEDY_BELOW, so logits / temp stays finite
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        # One descending sort serves both top-k (rank cut) and top-p (nucleus; Holtzman et al. 2019).
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=dev)[None]
        k = torch.tensor([min(p.top_k, V) if p.top_k > 0 else V for p in params], device=dev)[:, None]
        # rows without nucleus sampling get a threshold no rounding error can reach
        top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device=dev,
                             dtype=probs.dtype)[:, None]
        drop = rank >= k
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        drop = drop | ((mass_before >= top_p * sorted_p.sum(-1, keepdim=True)) & (rank > 0))
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=probs.dtype)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs


def draw(probs: torch.Tensor, uniforms: list[float]) -> torch.Tensor:
    """Inverse-CDF sample: probs [R, V] (rows need not sum to 1), one uniform in [0, 1) per row -> ids [R]."""
    cdf = probs.cumsum(-1)  # R V
    u = torch.tensor(uniforms, device=probs.device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    # right=True: the first index whose cumulative mass exceeds u, which never lands on a zero-probability id
    idx = torch.searchsorted(cdf, u, right=True)[:, 0]
    return idx.clamp_(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, params: list[SamplingParams], rngs: list[random.Random],
           penalty_states: list[PenaltyState | None], allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Next ids [B] for logits [B, V] (float32), one SamplingParams / random stream / penalty state per row.

    allowed: bool [B, V] from a grammar (constrain.py), or None: a disallowed id's logit becomes -inf before
    any processing, so penalties, temperature and the top-k/top-p/min-p cuts see only what the grammar allows."""
    B = logits.shape[0]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    pen_rows = [i for i in range(B) if penalty_states[i] is not None and params[i].needs_penalties]
    if pen_rows:
        logits = logits.clone()
        idx = torch.tensor(pen_rows, device=logits.device)
        logits[idx] = apply_penalties(logits[idx], [params[i] for i in pen_rows],
                                      [penalty_states[i] for i in pen_rows])
    out = logits.argmax(-1)  # greedy rows keep this
    hot = [i for i in range(B) if not params[i].greedy]
    if hot:
        rows = logits if len(hot) == B else logits[torch.tensor(hot, device=logits.device)]
        probs = filter_probs(rows, [params[i] for i in hot])
        ids = draw(probs, [rngs[i].random() for i in hot])
        if len(hot) == B:
            out = ids
        else:
            out[torch.tensor(hot, device=logits.device)] = ids
    return out


def logprobs_of(logits: torch.Tensor, ids: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                              torch.Tensor | None]:
    """Raw-model logprobs for rows: logits [R, V], chosen ids [R] -> (chosen [R], top values [R, top], top ids)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, ids[:, None])[:, 0]
    if top > 0:
        vals, tids = logp.topk(top, dim=-1)
        return chosen, vals, tids
    return chosen, None, None
