"""Which model a plan is about: a named preset's exact shape, or a Llama-like shape estimated from a parameter count.

FLOPs need only the parameter count (6·N·D), but activation memory, KV-cache bytes and the attention term need a
shape. A preset (lmforge.model.config.PRESETS) gives the real one. Given only `--params N`, we build the
Llama-like decoder of that size so the memory figures still exist, and say they are estimates: head_dim 128,
layers ≈ hidden / 128 (Llama 2 7B is 4096 / 32), hidden rounded to a multiple of 1024, SwiGLU width
8/3·hidden, GQA with 8 KV heads (fewer below 1024 wide), a 32K vocabulary (8K under 300M, 2K under 20M); then the layer count that lands on N.
The 6·N·D FLOP count uses N as given, never the estimated shape's own count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.model.accounting import n_params
from lmforge.model.config import PRESETS, ModelConfig, preset


@dataclass
class Shape:
    name: str  # preset name, or "~7B (estimated shape)"
    cfg: ModelConfig
    params: float  # the N used for 6·N·D: the preset's exact count or the user's --params
    estimated: bool  # True when cfg was derived from a bare parameter count


def estimate_config(params: float, vocab_size: int | None = None) -> ModelConfig:
    """A Llama-like ModelConfig with about `params` parameters (see the module docstring for the rules)."""
    if params <= 0:
        raise LmforgeError(f"--params must be positive, got {params:g}")
    if vocab_size is None:  # small models use small vocabularies, or the embedding alone would exceed N
        vocab_size = 32000 if params >= 3e8 else 8192 if params >= 2e7 else 2048
    # N ≈ 12·L·d² + 2·V·d with L = d/128  ->  N ≈ (12/128)·d³ + 2·V·d; solve for d by bisection.
    lo, hi = 1.0, 1e6
    for _ in range(100):
        mid = (lo + hi) / 2
        if 12 / 128 * mid**3 + 2 * vocab_size * mid < params:
            lo = mid
        else:
            hi = mid
    # hidden a multiple of 8 heads x 128 once it is that big, so 8 KV heads divide the query heads evenly
    step = 1024 if lo >= 1024 else 128
    d = max(128, int(round(lo / step)) * step)
    heads = d // 128
    kv = min(8, heads)
    inter = max(128, int(round(8 / 3 * d / 128)) * 128)
    one = ModelConfig(vocab_size=vocab_size, hidden_size=d, n_layers=1, n_heads=heads, n_kv_heads=kv,
                      intermediate_size=inter, max_seq_len=4096)
    per_layer = n_params(one.replace(n_layers=2)) - n_params(one)
    fixed = n_params(one) - per_layer
    layers = max(1, int(round((params - fixed) / per_layer)))
    return one.replace(n_layers=layers)


def resolve(preset_name: str | None, params: float | None) -> Shape:
    """The Shape for a `--preset NAME` or a `--params N` (exactly one of them)."""
    if preset_name and params:
        raise LmforgeError("give either --preset (a known shape) or --params (a size), not both")
    if preset_name:
        cfg = preset(preset_name)
        return Shape(preset_name, cfg, float(n_params(cfg)), False)
    if params:
        cfg = estimate_config(params)
        return Shape(f"{_short(params)} params (Llama-like shape estimated)", cfg, float(params), True)
    raise LmforgeError(f"say which model: --params N (e.g. 7e9) or --preset NAME ({', '.join(PRESETS)})")


def is_preset(name: str) -> bool:
    return name in PRESETS


def describe(shape: Shape) -> str:
    c = shape.cfg
    return (f"{c.n_layers} layers, hidden {c.hidden_size}, {c.n_heads} heads ({c.n_kv_heads} KV), "
            f"MLP {c.intermediate_size}, vocab {c.vocab_size}" + (" - estimated" if shape.estimated else ""))


def _short(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def as_dict(shape: Shape) -> dict:
    return {"name": shape.name, "params": shape.params, "estimated_shape": shape.estimated,
            "config": dataclasses.asdict(shape.cfg)}
