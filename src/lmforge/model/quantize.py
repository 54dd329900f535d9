"""Weight-only int8 quantization by module surgery: every projection nn.Linear becomes an Int8Linear.

Per-output-channel symmetric int8 (as LLM.int8's vector-wise weights, Dettmers et al. 2022, without outliers;
gpt-fast's and torchao's int8 weight-only): scale[o] = max_i |W[o, i]| / 127, Wq = round(W / scale) in
[-127, 127]. Decode on CPU reads weights once per token, so 4x fewer weight bytes than fp32 is the speedup.

Forward, measured on an AVX-512/AMX Xeon (benchmarks/bench_decode.py):
  - few rows (decode, M <= 16): torch's fused weight-only kernel `torch._weight_int8pack_mm`, which reads the
    int8 weight and dequantizes in registers. Its fast path takes bf16 activations, so x is rounded to bf16 for
    the matmul (this and the int8 rounding together are the perplexity change reported by
    benchmarks/eval_quantize.py);
  - many rows (prefill): dequantize to bf16 once per call and use the bf16 GEMM (compute-bound there anyway).
  - without that kernel (old torch, other devices, in_features not a multiple of 16): dequantize, then F.linear.

What is quantized: attention and MLP projections and the lm_head (in small models the lm_head is a large share
of the bytes read per token; when tied, the embedding table stays full precision, since a lookup reads one
row). Surgery is from outside: the model file stays plain; the module holds `qweight` and `scale`, no `weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
_FUSED_MAX_ROWS = 16  # above this many rows the dequantize + bf16 GEMM path is faster (measured)
_HAS_PACK_MM = hasattr(torch, "_weight_int8pack_mm")


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w [out, in] -> (qweight int8 [out, in], scale float32 [out])."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = x (qweight * scale)^T + bias, with qweight int8 [out, in] and scale [out]."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight)
        dev = linear.weight.device
        self.register_buffer("qweight", q.to(dev))
        self.register_buffer("scale", scale.to(dev))
        self.register_buffer("scale_bf16", scale.to(device=dev, dtype=torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        # the fused kernel crashes (torch 2.13) when in_features is not a multiple of 16: fall back there
        self.fused = _HAS_PACK_MM and self.in_features % 16 == 0

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.fused and x.device.type == "cpu" and x2.shape[0] <= _FUSED_MAX_ROWS:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight, self.scale_bf16)
        elif x.device.type == "cpu":
            y = F.linear(x2.to(torch.bfloat16), self.dequantize(torch.bfloat16))
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, targets: tuple[str, ...] = PROJECTIONS) -> nn.Module:
    """Replace every nn.Linear whose name ends in one of `targets` by an Int8Linear, in place. Returns model."""
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, Int8Linear(child))
                swapped += 1
    if swapped == 0:
        raise LmforgeError("found no nn.Linear projections to quantize (already quantized, or LoRA not merged?)")
    return model


def quantize(model: nn.Module, method: str | None) -> nn.Module:
    """Apply a named method: None/'none' (no change) or 'int8'."""
    if method in (None, "", "none"):
        return model
    if method == "int8":
        return quantize_int8(model)
    raise LmforgeError(f"unknown quantization {method!r}; choose int8 or none")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (what decode reads per token, the KV cache aside)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
