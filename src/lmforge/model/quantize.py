"""Weight-only int8 and int4 quantization by module surgery: every projection nn.Linear (the output head
included) becomes an Int8Linear or an Int4Linear.

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

int4 (Int4Linear): groups of `group_size` input columns (default 32, llama.cpp's q4 block) with an asymmetric
min/max range each (scale = (max - min) / 15, w = q * scale + min: gpt-fast's, torchao's and llama.cpp's q4_1),
in one of two packings, chosen when the layer is made:
  - "q4" (groups of 32 on a CPU with AVX512-VNNI): lmforge's own kernel (model/cpu_kernels.cpp), 16 bytes a block
    plus a float16 scale and minimum; up to Q4_MAX_ROWS rows (prompts included) it rounds each block of
    activations to int8 and multiplies with integer dot products, as llama.cpp does for decode and prompts alike
    (1.5-1.6x torch's int4 kernel at one row);
  - "torch" (elsewhere): torch's CPU layout for `torch.ops.aten._weight_int4pack_mm_for_cpu`, which reads 4 bits
    per weight and dequantizes in registers (bf16 activations, bf16 scales), up to _INT4_FUSED_MAX_ROWS rows.
Many rows (prefill; with lmforge's kernel only beyond Q4_MAX_ROWS): the weight is unpacked to bf16 (W^T) once
per call for the bf16 GEMM, as for int8: torch's kernels' cost grows with the rows (at 512 rows ~4x the bf16
GEMM), unpacking costs about one GEMM. A
projection whose shape the kernels cannot take (out_features not a multiple of 16, in_features not a multiple of
any group size down to 16) stays int8, and `quantize` says so.
CPU only: the kernels and their packings are the CPU ones.

What is quantized: attention and MLP projections (fused qkv_proj / gate_up_proj too) and the lm_head (in small
models the lm_head is a large share of the bytes read per token; when tied, the embedding table stays full
precision, since a lookup reads one row, and the head gets its own quantized copy). Surgery is from outside:
the model file stays plain; the module holds `qweight` and scales, no `weight`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import cpu_kernels

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
               "qkv_proj", "gate_up_proj")
METHODS = ("int8", "int4")
INT4_GROUP_SIZE = 32
log = logging.getLogger("lmforge.quantize")
_FUSED_MAX_ROWS = 16  # int8: above this many rows the dequantize + bf16 GEMM path is faster (measured)
_INT4_FUSED_MAX_ROWS = 128  # torch's int4 kernel stays ahead of unpacking + bf16 GEMM up to about here (measured)
# lmforge's q4 kernel up to here (prompts too, in chunks), unpacking + bf16 GEMM beyond: with 16-row tiles the
# kernel took 0.2-0.8x the time of unpacking + the bf16 GEMM from 16 to 512 rows (27M and 0.5B shapes, 2 threads)
Q4_MAX_ROWS = 512
_DEQUANT_CHUNK = 1 << 18  # fp32 elements per step of Int4Linear.dequantize_t (1 MB: stays in cache)
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


def quantize_int4_weight(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int32 [out, in] in 0..15, scale [out, in/g], minimum [out, in/g]); w ~ q * scale + min."""
    n, k = w.shape
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((wg - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.int32).reshape(n, k)
    return q, scale, lo


def unpack_int4_t(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Invert `_convert_weight_to_int4pack_for_cpu`, transposed: packed uint8 [n, k/2] -> uint8 [k, n] in 0..15.

    torch's CPU layout (checked by tests against the packing op): rows in blocks of 64, each [k, 32] bytes whose
    low nibble is row r and high nibble row r + 32; a tail of n mod 64 rows as [k, tail/2] bytes packing rows
    2j (low) and 2j + 1 (high). Both are already k-major, so W^T comes out with one write per nibble and no
    transposing copy."""
    blocks, tail = n // 64, n % 64
    out = torch.empty(k, n, dtype=torch.uint8, device=packed.device)
    if blocks:
        b = packed[:blocks * 64].reshape(blocks, k, 32).transpose(0, 1)  # k blocks 32
        o = out[:, :blocks * 64].view(k, blocks, 64)
        torch.bitwise_and(b, 15, out=o[..., :32])
        torch.bitwise_right_shift(b, 4, out=o[..., 32:])
    if tail:
        t = packed[blocks * 64:].reshape(k, tail // 2)
        o = out[:, blocks * 64:].view(k, tail // 2, 2)
        torch.bitwise_and(t, 15, out=o[..., 0])
        torch.bitwise_right_shift(t, 4, out=o[..., 1])
    return out


def pack_q4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q [n, k] in 0..15 with scale and minimum [n, k/32] -> (qweight uint8 [n/16, 8k], scales, mins float16
    [n/16, 16 k/32]) in cpu_kernels.cpp's layout: tiles of 16 rows; per tile, per block of 32, 4 chunks of 64 bytes
    in which row r's 4 bytes j hold q[r, 8c + j] | q[r, 8c + 4 + j] << 4; scales and minimums per tile, per block,
    the 16 rows'. n must be a multiple of 16."""
    n, k = q.shape
    nb, t = k // 32, n // 16
    qb = q.reshape(t, 16, nb, 4, 2, 4).to(torch.uint8)  # t r b c half j
    packed = (qb[..., 0, :] | (qb[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)  # t b c r j
    return (packed.reshape(t, 8 * k).contiguous(),
            scale.to(torch.float16).reshape(t, 16, nb).transpose(1, 2).reshape(t, 16 * nb).contiguous(),
            lo.to(torch.float16).reshape(t, 16, nb).transpose(1, 2).reshape(t, 16 * nb).contiguous())


def unpack_q4_t(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, n: int, k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Invert `pack_q4`, transposed: (q uint8 [k, n] in 0..15, scale and minimum float32 [k/32, n])."""
    nb, t = k // 32, n // 16
    w = qweight.view(t, nb, 4, 16, 4).permute(1, 2, 4, 0, 3)  # b c j t r
    q = torch.empty(nb, 4, 2, 4, t, 16, dtype=torch.uint8, device=qweight.device)  # b c half j t r
    torch.bitwise_and(w, 15, out=q[:, :, 0])
    torch.bitwise_right_shift(w, 4, out=q[:, :, 1])

    def per_block(v: torch.Tensor) -> torch.Tensor:
        return v.float().view(t, nb, 16).transpose(0, 1).reshape(nb, n)

    return q.view(k, n), per_block(scales), per_block(mins)


def int4_group_size(linear: nn.Linear, group_size: int) -> int | None:
    """The largest group size <= group_size (powers of two down to 16) the int4 kernel takes for this layer."""
    if linear.out_features % 16:
        return None
    g = group_size
    while g >= 16:
        if linear.in_features % g == 0:
            return g
        g //= 2
    return None


class Int4Linear(nn.Module):
    """y = x W^T + bias, W in int4 groups (see the module docstring), packed for a CPU kernel: `packing` is "q4"
    (lmforge's kernel: buffers qweight, scales, mins) or "torch" (torch's: buffers qweight, scales_zeros)."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        if linear.weight.device.type != "cpu":
            raise LmforgeError("int4 quantization runs on CPU only (CPU int4 kernels); use int8 elsewhere")
        q, scale, lo = quantize_int4_weight(linear.weight, group_size)
        self.packing = "q4" if group_size == 32 and cpu_kernels.available() else "torch"
        if self.packing == "q4":
            cpu_kernels.load()
            qweight, scales, mins = pack_q4(q, scale, lo)
            self.register_buffer("qweight", qweight)  # n/16 8k uint8
            self.register_buffer("scales", scales)  # n/16 16k/32 float16
            self.register_buffer("mins", mins)
        else:
            # torch's kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale
            zeros = lo + 8 * scale
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))  # n k/2
            self.register_buffer("scales_zeros", torch.stack([scale, zeros], dim=-1).transpose(0, 1).contiguous()
                                 .to(torch.bfloat16))  # k/g n 2
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantize_t(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W^T [in, out]: the layout torch's packing leaves, and what the prefill GEMM takes as is. Computed in
        fp32 a few groups at a time: unpacking W itself (a transposing copy), one whole-matrix fp32 temporary
        (page faults on a fresh allocation each call) or bf16 broadcasting ops (torch's are slow) made it 3-5x
        slower."""
        n, k, g = self.out_features, self.in_features, self.group_size
        if self.packing == "q4":
            q, scale, offset = unpack_q4_t(self.qweight, self.scales, self.mins, n, k)
            q, scale, offset = q.view(k // g, g, n), scale[:, None], offset[:, None]  # k/g g n, k/g 1 n
        else:
            q = unpack_int4_t(self.qweight, n, k).view(k // g, g, n)
            sz = self.scales_zeros.float()[:, None]  # k/g 1 n 2
            scale, offset = sz[..., 0], sz[..., 1] - 8 * sz[..., 0]  # the kernel's (q - 8) * scale + zero
        out = torch.empty(k // g, g, n, dtype=dtype, device=q.device)
        step = max(1, _DEQUANT_CHUNK // (g * n))
        for i in range(0, k // g, step):
            out[i:i + step] = torch.addcmul(offset[i:i + step], q[i:i + step].float(), scale[i:i + step])
        return out.view(k, n)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_t(dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.packing == "q4" and x2.shape[0] <= Q4_MAX_ROWS:
            y = cpu_kernels.q4_mm(x2, self.qweight, self.scales, self.mins)
        elif self.packing == "q4":
            y = F.linear(x2.to(torch.bfloat16), cpu_kernels.q4_dequant(self.qweight, self.scales, self.mins))
        elif x2.shape[0] <= _INT4_FUSED_MAX_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.qweight,
                                                           self.group_size, self.scales_zeros)
        else:
            y = x2.to(torch.bfloat16) @ self.dequantize_t(torch.bfloat16)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of "
                f"{self.group_size}, {self.packing} packing")


def _swap(model: nn.Module, targets: tuple[str, ...], make) -> int:
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, make(child))
                swapped += 1
    if swapped == 0:
        raise LmforgeError("found no nn.Linear projections to quantize (already quantized, or LoRA not merged?)")
    return swapped


def quantize_int8(model: nn.Module, targets: tuple[str, ...] = PROJECTIONS) -> nn.Module:
    """Replace every nn.Linear whose name ends in one of `targets` by an Int8Linear, in place. Returns model."""
    _swap(model, targets, Int8Linear)
    return model


def quantize_int4(model: nn.Module, group_size: int = INT4_GROUP_SIZE,
                  targets: tuple[str, ...] = PROJECTIONS) -> nn.Module:
    """Replace every target nn.Linear by an Int4Linear (an Int8Linear where the int4 kernel cannot take its
    shape), in place. Returns model."""
    if group_size not in (16, 32, 64, 128, 256):
        raise LmforgeError(f"int4 group size must be 16, 32, 64, 128 or 256, got {group_size}")
    fallback = []

    def make(linear: nn.Linear) -> nn.Module:
        g = int4_group_size(linear, group_size)
        if g is None:
            fallback.append(f"{linear.out_features}x{linear.in_features}")
            return Int8Linear(linear)
        return Int4Linear(linear, g)

    _swap(model, targets, make)
    if fallback:
        log.warning("int4: %d projection(s) of shapes %s stay int8 (the int4 kernel needs out_features %% 16 == 0 "
                    "and in_features a multiple of 16)", len(fallback), ", ".join(sorted(set(fallback))))
    return model


def quantize(model: nn.Module, method: str | None, group_size: int | None = None) -> nn.Module:
    """Apply a named method: None/'none' (no change), 'int8' or 'int4' (groups of group_size, default
    INT4_GROUP_SIZE)."""
    if method in (None, "", "none"):
        return model
    if method == "int8":
        return quantize_int8(model)
    if method == "int4":
        return quantize_int4(model, group_size or INT4_GROUP_SIZE)
    raise LmforgeError(f"unknown quantization {method!r}; choose int8, int4 or none")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (what decode reads per token, the KV cache aside)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
