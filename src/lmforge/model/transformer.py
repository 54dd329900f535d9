"""The Llama-family decoder: RMSNorm, RoPE (with Llama 3.1, linear and YaRN scaling), grouped-query attention
through scaled_dot_product_attention, SwiGLU MLP, and a preallocated KV cache. Nothing else: LoRA, quantization,
parallelism and checkpoints wrap or load this model from outside.

Module names follow Hugging Face's Llama layout (model.layers.N.self_attn.q_proj, ...) so that a state dict
maps 1:1 onto model.safetensors and PEFT adapter keys line up; checkpoint.py still owns the translation of
config.json. Weights use HF's rotate-half RoPE convention, so HF checkpoints load with no permutation.

Shapes: B batch, T new tokens, L attended length, H query heads, K kv heads, D head size (cfg.head_size), C hidden
size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import accounting, cpu_kernels, memory
from lmforge.model.config import ModelConfig, rope_type


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _norm_kernel(x, self.weight):
            # under bf16 autocast every reader of the output is a matmul that rounds it to bf16: round it once here
            y = cpu_kernels.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.eps, True)
            return y.view(x.shape)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _norm_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether RMSNorm takes lmforge's kernel (cpu_kernels.cpp, section 6): eager training under CPU bf16 autocast,
    fp32 activations and weight. Compiled blocks keep torch's ops, which Inductor fuses with their neighbours."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not torch.compiler.is_compiling()
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and cpu_kernels.available())


def _swiglu_kernel(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the MLP takes lmforge's SwiGLU kernel (cpu_kernels.cpp, section 7): eager training on CPU with bf16
    projections (autocast's); compiled blocks keep torch's ops, which Inductor fuses."""
    return (gate.device.type == "cpu" and gate.dtype == up.dtype == torch.bfloat16 and not torch.compiler.is_compiling()
            and gate.is_contiguous() and up.is_contiguous() and cpu_kernels.available())


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [D/2] (RoFormer, Su et al. 2021), scaled as cfg.rope_scaling says.

    llama3: Llama 3.1's band-wise scaling; linear: position interpolation (Chen et al. 2023); yarn: YaRN
    (Peng et al. 2023), as transformers' `_compute_yarn_parameters` computes it (its cos/sin factor is
    `rope_attention_factor`). ModelConfig.validate has already refused other types and bad values.
    """
    d = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling or {}
    kind = rope_type(rs)
    if kind == "llama3":
        factor, low, high = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_ctx = rs.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "yarn":
        factor, old_ctx = _yarn_factor(cfg)
        # Dimensions that turn fewer than beta_slow times over the original context are interpolated (divided by
        # factor), those that turn more than beta_fast times keep their frequency, with a linear ramp between.
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

        def dim_for(rotations: float) -> float:  # the dimension whose wavelength fits `rotations` times
            return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        low, high = dim_for(beta_fast), dim_for(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # as HF: avoid dividing by zero
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1 = extrapolate (original frequency), 0 = interpolate
        inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    return inv_freq


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor YaRN multiplies cos and sin by (so attention logits by its square); 1 for other RoPE types.

    attention_factor if given; else DeepSeek's mscale ratio when mscale and mscale_all_dim are both given;
    else YaRN's 0.1 ln(factor) + 1 (Peng et al. 2023, eq. 22).
    """
    rs = cfg.rope_scaling or {}
    if rope_type(rs) != "yarn":
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    factor, _ = _yarn_factor(cfg)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
    return mscale(factor)


def _yarn_factor(cfg: ModelConfig) -> tuple[float, int]:
    """(factor, original context): factor defaults to max_position_embeddings / original, as in HF."""
    rs = cfg.rope_scaling or {}
    old_ctx = rs.get("original_max_position_embeddings") or cfg.max_seq_len
    factor = rs.get("factor")
    return (float(factor) if factor is not None else cfg.max_seq_len / old_ctx), old_ctx


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def _rope_kernel(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether lmforge's RoPE kernel rotates x (cpu_kernels.cpp, section 8): eager training on CPU with bf16
    projections (autocast's) and fp32 tables, whose bf16 result the attention matmuls read (the fp32 product
    would be rounded to just that). Compiled blocks keep torch's ops, which Inductor fuses."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and cos.dtype == torch.float32
            and not torch.compiler.is_compiling() and x.stride(-1) == 1 and x.shape[-1] % 2 == 0
            and cpu_kernels.available())


class KVCache:
    """Keys and values of up to `slots` sequences: one [slots, K, capacity, D] pair per layer, grown on demand.

    Each slot holds one sequence. A forward with `input_pos` writes its new keys/values at those positions
    and attends to positions <= its own, so stale entries from a slot's previous occupant are never read.

    Each slot's head is one contiguous [capacity, D] block: a decode step's rows read `k[:B, :, :L]` as a view
    whose attention matmuls run over contiguous keys (with positions outermost, as before, every key was a
    strided row and the batched matmuls of 16 decode rows copied them first: 173 us a call against ~40).
    The compiled decode step takes the capacity as a dynamic size (inference/decode.py), so growing the cache
    (`reserve`: a larger allocation with the old positions copied in) never recompiles. `capacity` positions are
    allocated at construction (default: all of `max_len`); `reserve(n)` grows to max(n, twice the capacity),
    never beyond `max_len`.
    A cache the device cannot hold is refused up front with an LmforgeError that says how to shrink it:
    torch zero-fills CPU memory page by page, so an oversized cache would otherwise swap or meet the OOM killer.
    """

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device=None, dtype=torch.float32,
                 capacity: int | None = None):
        self.cfg, self.slots, self.max_len, self.device, self.dtype = cfg, slots, max_len, device, dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._allocate(min(capacity or max_len, max_len))

    @property
    def capacity(self) -> int:
        """Positions per slot allocated now."""
        return self.k[0].shape[2]

    def bytes_for(self, positions: int) -> int:
        return int(accounting.kv_cache_bytes(self.cfg, positions, self.slots, self.itemsize))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reserve(self, length: int) -> None:
        """Make room for `length` positions per slot, keeping what the slots hold."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"sequence of {length} positions exceeds the KV cache ({self.max_len})")
        self._allocate(min(self.max_len, max(length, 2 * self.capacity)))

    def _allocate(self, capacity: int) -> None:
        shape = (self.slots, self.cfg.n_kv_heads, capacity, self.cfg.head_size)
        need = self.bytes_for(capacity) - self.nbytes()  # the old tensors go as the new ones come
        free = memory.available_bytes(self.device)
        if free is not None and need > free:
            raise LmforgeError(_cache_too_big(self.cfg, self.slots, capacity, self.bytes_for(capacity), free,
                                              self.itemsize, self.device))
        try:
            # plain tensors even inside inference_mode, so a compiled step sees the same kind after a growth
            with torch.inference_mode(False):
                for store in (self.k, self.v):
                    for i in range(self.cfg.n_layers):
                        t = torch.zeros(shape, device=self.device, dtype=self.dtype)
                        if i < len(store):
                            n = min(store[i].shape[2], capacity)
                            t[:, :, :n].copy_(store[i][:, :, :n])
                            store[i] = t
                        else:
                            store.append(t)
        except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e):
                raise
            raise LmforgeError(_cache_too_big(self.cfg, self.slots, capacity, self.bytes_for(capacity),
                                              memory.available_bytes(self.device), self.itemsize,
                                              self.device)) from None


def _cache_too_big(cfg: ModelConfig, slots: int, max_len: int, need: int, free: int | None, itemsize: int,
                   device) -> str:
    where = str(device or "cpu")
    have = f"{memory.format_bytes(free)} free" if free is not None else "not enough free"
    fits = int(free // accounting.kv_cache_bytes(cfg, 1, slots, itemsize)) if free else 0
    hint = (f"about {fits} positions fit here" if fits >= 2 else "no context fits in what is free")
    return (f"the KV cache for {slots} sequence(s) of {max_len} positions needs {memory.format_bytes(need)} "
            f"({need} bytes), but {where} has {have}; the model's context (max_position_embeddings) is "
            f"{cfg.max_seq_len}. Lower the context with --max-len N ({hint}), or serve fewer sequences at once "
            f"with --max-batch")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_size = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.n_heads * cfg.head_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_size, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_size, cfg.hidden_size, bias=False)
        self.fused = False

    def fuse(self) -> None:
        """One qkv_proj for q/k/v (one matmul instead of three); state_dict() still says q_proj, k_proj, v_proj."""
        if not self.fused:
            self.qkv_proj = _concat_linears(self, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
            self.fused = True

    def forward(self, x, cos, sin, ctx: _Context, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_size, self.n_kv * self.head_size,
                                              self.n_kv * self.head_size], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_size).transpose(1, 2)  # B H T D
        k = k.view(B, T, self.n_kv, self.head_size).transpose(1, 2)  # B K T D
        v = v.view(B, T, self.n_kv, self.head_size).transpose(1, 2)
        if self.training and ctx.cache is None and _rope_kernel(q, cos):
            cos3, sin3 = cos.reshape(-1, T, self.head_size), sin.reshape(-1, T, self.head_size)
            q, k = cpu_kernels.rope(q, cos3, sin3), cpu_kernels.rope(k, cos3, sin3)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx.cache is not None:
            k, v = ctx.write_and_read(layer, k, v)  # B K L D
        dtype = q.dtype
        if self.training and _cpu_training_attention(q, k):
            y = training_attention(q, k, v, ctx.mask, ctx.is_causal)
        else:
            if q.device.type == "cpu" and dtype != torch.float32:
                # 16-bit attention on CPU is several times slower than fp32 (measured: 149 vs 22 us per decode call
                # over a 256-position cache); the casts of q and the keys read cost far less
                q, k, v = q.float(), k.float(), v.float()
            if T == 1 and not self.training:  # decode
                y = decode_attention(q, k, v, ctx.mask).to(dtype)
            else:  # enable_gqa: each group of H/K query heads reads one kv head, without repeating k and v
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal,
                                                   enable_gqa=self.n_kv != self.n_heads).to(dtype)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_size))


# Scores training_attention keeps for backward, per layer: 2^24 elements (64 MB of fp32 and 32 MB of bf16), e.g. 8
# rows of 8 heads over 512 tokens. Past it, scaled_dot_product_attention, which keeps O(T) per head.
MATH_ATTENTION_MAX_SCORES = 2**24


def _cpu_training_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `training_attention` takes a training-mode call: bf16 autocast on CPU (eager or compiled), with
    scores small enough to keep for backward. Training-mode forwards without gradients take it too (DPO's and
    KTO's reference log-probabilities), so that policy and reference attend alike."""
    B, H, T, _ = q.shape
    return (q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and B * H * T * k.shape[2] <= MATH_ATTENTION_MAX_SCORES)


def training_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       is_causal: bool) -> torch.Tensor:
    """Attention written as two bf16 batched matmuls around an fp32 softmax (as Hugging Face's eager attention
    computes it under autocast), for training on CPU under bf16 autocast: scaled_dot_product_attention's CPU flash
    kernel ran at a third of the fp32 peak, its backward slowest of all. The scaling, masking, softmax and casts
    are one pass over the scores each way (`_scores_softmax`: lmforge's kernel, eager and compiled alike). Causal
    attention goes in two parts of the queries, the first over its own keys only: 3/4 of the scores. q [B, H, T,
    D], k, v [B, K, L, D]; mask [B or 1, 1, T, L] bool (True = attend) or None.

    8/4 heads of 64, 8 x 256 tokens, 2 threads, forward and backward of one layer: compiled 19-22 ms against 27-32
    unsplit and 27.3 for the flash kernel in fp32 (16-bit inputs are no faster there). In the models: the 27M
    pretrain step eager 1,622-1,723 tokens/s against 1,504-1,568 with the flash kernel; preset tiny with LoRA, 16 x
    100 tokens, eager 6,228-6,754 against 4,365-4,960. The softmax kernel then: the scores' softmax of the second
    part (8 x 8 heads x 128 queries x 256 keys), forward and backward, 9.2 ms in torch's ops, 1.2 ms; the 27M step
    1.07x eager, 1.06x compiled (steps of both alternated in one process)."""
    T, L = q.shape[2], k.shape[2]
    if is_causal and T == L and T > 1:  # any T (a test of its parity would be a guard: a recompile per parity)
        h = T // 2
        first = _math_attention(q[:, :, :h], k[:, :, :h], v[:, :, :h], None, True)
        second = _math_attention(q[:, :, h:], k, v, None, True)
        return torch.cat([first, second], dim=2)
    return _math_attention(q, k, v, mask, is_causal)


def _math_attention(q, k, v, mask, causal):
    B, H, T, D = q.shape
    K, L = k.shape[1], k.shape[2]
    s = (q.reshape(B, K, H // K * T, D) @ k.transpose(-1, -2)).view(B, H, T, L)  # head h = kv head h // (H/K)
    p = _scores_softmax(s, None if mask is None else mask.reshape(-1, T, L), causal, D ** -0.5)
    return (p.view(B, K, H // K * T, L) @ v).view(B, H, T, D)


def _scores_softmax(s: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float) -> torch.Tensor:
    """softmax(scale * s) in fp32 over the attended keys, as bf16: s [B, H, T, L] bf16, mask [1 or B, T, L] bool
    (True = attend) or None, causal: the T queries are the last T of L positions. lmforge's kernel where it can
    (one pass per row, forward and backward: cpu_kernels.cpp, section 5), else torch's ops."""
    if s.dtype == torch.bfloat16 and _softmax_kernel():
        return cpu_kernels.attn_softmax(s, mask, causal, scale)
    x = s.float() * scale
    if causal:
        x = x.masked_fill(~_causal(s.shape[2], s.shape[3], s.device), float("-inf"))
    if mask is not None:
        x = x.masked_fill(~mask[:, None], float("-inf"))
    return x.softmax(-1).to(torch.bfloat16)


@torch.compiler.assume_constant_result  # decided once when compiled: tracing the check (it reads /proc) would break the graph
def _softmax_kernel() -> bool:
    return cpu_kernels.available() and cpu_kernels.load() is not None


def _causal(T: int, L: int, device) -> torch.Tensor:
    """[T, L] bool: the last T of L positions as queries, each seeing the keys up to its own."""
    return torch.ones(T, L, dtype=torch.bool, device=device).tril(L - T)


def _attention_kernel(q, k, v, mask) -> bool:
    """Whether lmforge's decode attention kernel (model/cpu_kernels.cpp) takes this call: fp32 on a CPU that has
    it, head size a multiple of 16, a bool mask, and no gradient wanted (it has no backward)."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32 and q.shape[-1] % 16 == 0
            and (mask is None or mask.dtype == torch.bool) and k.stride(-1) == 1 and v.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and cpu_kernels.available())


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row, q [B, H, 1, D], over k, v [B, K, L, D] (mask [B, 1, 1, L], True = attend):
    lmforge's kernel where it can (`_attention_kernel`: a task per row and kv head reads that head's keys and
    values once for its H/K query heads), else two batched matmuls, each group of H/K query heads against its kv
    head. fp32, 8/4 heads of 64, 2 threads, eager: the kernel 8.6 us for 1 row over 100 keys (the matmuls 34.8),
    16 rows over 100 keys 82 us (139), over 500 keys 485 us (614, both at the memory's speed), 1 row over 2,000
    keys 60 us (143). The matmuls were ~2x faster than scaled_dot_product_attention, whose flash kernel is built
    for many queries (16 rows over 130 keys 0.28-0.36 ms vs 0.51-0.67; over 1,000 keys 1.8-2.1 vs 3.9-4.2)."""
    B, H, _, D = q.shape
    K, L = k.shape[1], k.shape[2]
    if _attention_kernel(q, k, v, mask):
        m = torch.ones(B, L, dtype=torch.bool, device=q.device) if mask is None else mask.expand(B, 1, 1, L)
        return cpu_kernels.decode_attention(q.reshape(B, H, D), k, v, m.reshape(B, L)).view(B, H, 1, D)
    s = (q.reshape(B, K, H // K, D) @ k.transpose(-1, -2)) * D ** -0.5  # B K H/K L
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).reshape(B, H, 1, D)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused = False

    def fuse(self) -> None:
        """One gate_up_proj for gate/up; state_dict() still says gate_proj, up_proj."""
        if not self.fused:
            self.gate_up_proj = _concat_linears(self, ("gate_proj", "up_proj"), "gate_up_proj")
            self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.training and _swiglu_kernel(gate, up):
            return self.down_proj(cpu_kernels.swiglu(gate, up))
        return self.down_proj(F.silu(gate) * up)


def _concat_linears(module: nn.Module, names: tuple[str, ...], fused_name: str) -> nn.Linear:
    """The nn.Linears `names` of `module` stacked along their outputs into one (removed from `module`), and a
    state_dict hook that writes the stacked weights back under the original names, so checkpoints keep HF's."""
    parts = [getattr(module, n) for n in names]
    if any(type(p) is not nn.Linear for p in parts):
        raise LmforgeError(f"cannot fuse {', '.join(names)}: fuse before quantizing or adding LoRA")
    w = parts[0].weight
    fused = nn.Linear(w.shape[1], sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                      device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    fused.requires_grad_(w.requires_grad)
    sizes = [p.out_features for p in parts]
    for n in names:
        delattr(module, n)

    def split_back(mod, state_dict, prefix, local_metadata):
        for kind in ("weight", "bias"):
            key = f"{prefix}{fused_name}.{kind}"
            if key in state_dict:
                for n, t in zip(names, state_dict.pop(key).split(sizes)):
                    state_dict[f"{prefix}{n}.{kind}"] = t
    module.register_state_dict_post_hook(split_back)
    return fused


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, ctx, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Context:
    """Per-forward attention bookkeeping shared by all layers: cache writes, the mask, causal flag."""

    def __init__(self, cache, slots, start, pos, mask, is_causal, length, write_mask=None):
        self.cache, self.slots, self.start, self.pos = cache, slots, start, pos
        self.mask, self.is_causal, self.length, self.write_mask = mask, is_causal, length, write_mask

    def write_and_read(self, layer, k, v):
        """Write this forward's keys/values k, v [B, K, T, D]; return the keys/values to attend to [B, K, L, D]."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # S K capacity D
        L = self.length
        # the rows' slots: 0..B-1 (a view of the cache, no gathered copy: decode speed) or `slots`
        rows = slice(0, k.shape[0]) if self.slots is None else self.slots
        if self.pos is None:  # contiguous positions start..start+T, shared by the rows
            T = k.shape[2]
            kc[rows, :, self.start:self.start + T] = k
            vc[rows, :, self.start:self.start + T] = v
        else:  # per-row positions [B, T]; the index dims come first: kc[idx, :, pos] is B T K D
            idx = (torch.arange(k.shape[0], device=k.device) if self.slots is None else self.slots)[:, None]
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # B T K D
            if self.write_mask is not None:  # rows left out write back what the cache holds there
                keep = self.write_mask[:, None, None, None]
                k, v = torch.where(keep, k, kc[idx, :, self.pos]), torch.where(keep, v, vc[idx, :, self.pos])
            kc[idx, :, self.pos] = k
            vc[idx, :, self.pos] = v
        return kc[rows, :, :L], vc[rows, :, :L]


class Body(nn.Module):
    """HF's `model.` prefix: embeddings, the layer stack, the final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # plain attributes, not buffers: Module.to(bfloat16) must not round the rotary frequencies
        self.inv_freq = rope_inv_freq(cfg)
        self.rope_scale = rope_attention_factor(cfg)  # YaRN's cos/sin factor; 1 otherwise
        self.activation_checkpointing = False

    # ---- construction -------------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 style init: N(0, init_std), residual output projections scaled by 1/sqrt(2 * n_layers)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("layernorm.weight") or name.endswith("norm.weight") else nn.init.zeros_(p)
                continue
            s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * s)

    def new_cache(self, slots: int, max_len: int | None = None, dtype=None, capacity: int | None = None) -> KVCache:
        """A KVCache of `slots` sequences up to max_len positions (default: the context), `capacity` allocated now
        (default: all of it); in the model's dtype unless `dtype` is given."""
        max_len = max_len or self.cfg.max_seq_len
        w = self.model.embed_tokens.weight  # lm_head may be swapped out (quantization)
        return KVCache(self.cfg, slots, max_len, device=w.device, dtype=dtype or w.dtype, capacity=capacity)

    def fuse_projections(self) -> Transformer:
        """Concatenate every layer's q/k/v and gate/up projections (fewer, larger matmuls: faster inference).
        Checkpoints written from the fused model keep Hugging Face's names. Before quantization and LoRA."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    # ---- forward ------------------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # B T D/2 (or T D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        cos, sin = cos.to(dtype), sin.to(dtype)
        if cos.dim() == 2:
            return cos[None, None], sin[None, None]  # 1 1 T D
        return cos[:, None], sin[:, None]  # B 1 T D

    def window_mask(self, q_pos: torch.Tensor, L: int) -> torch.Tensor:
        """Bool mask [B or 1, 1, T, L] for query positions q_pos [B, T] (or [T]) over keys 0..L-1: key j is
        visible from query position p iff p - window < j <= p (j <= p without a sliding window)."""
        j = torch.arange(L, device=q_pos.device)
        qp = q_pos[..., None]  # (B) T 1
        ok = j <= qp
        if self.cfg.sliding_window and L > self.cfg.sliding_window:
            ok = ok & (j > qp - self.cfg.sliding_window)
        return ok[:, None] if ok.dim() == 3 else ok[None, None]

    def _attention_plan(self, T: int, positions: torch.Tensor, per_row: bool, start: int,
                        cache: KVCache | None, slots: torch.Tensor | None, mask: torch.Tensor | None,
                        cache_len: int | None, write_mask: torch.Tensor | None) -> _Context:
        """How every layer's attention runs in this forward: which cache rows it writes, how many keys L it reads,
        and its mask. Decided once here so that the layers only follow it.

        | cache | positions             | keys L                                  | mask, unless one is given           |
        |-------|-----------------------|-----------------------------------------|-------------------------------------|
        | no    | per-row tensor [B, T] | T                                       | window mask of the positions        |
        | no    | contiguous            | T                                       | window mask if the sliding window   |
        |       |                       |                                         | is shorter than T, else is_causal   |
        |       |                       |                                         | (T > 1) or none (T = 1)             |
        | yes   | per-row tensor [B, T] | cache_len, else the given mask's last   | window mask of the positions        |
        |       |                       | size, else max(pos) + 1                 |                                     |
        | yes   | contiguous from start | start + T                               | window mask if the sliding window   |
        |       |                       |                                         | is shorter than L; else is_causal   |
        |       |                       |                                         | (start = 0, T > 1), none (T = 1:    |
        |       |                       |                                         | one query sees every key) or window |
        |       |                       |                                         | mask (start > 0, T > 1)             |

        With a cache, rows are its slots 0..B-1 (read as a view) or the given `slots` (gathered); the cache grows
        to L positions first (KVCache.reserve). "Window mask" (`window_mask`) lets a query at position p see keys
        j with p - window < j <= p (just j <= p without a sliding window). Without a cache the keys are the T new
        tokens taken to sit at 0..T-1, so packed documents (positions restarting per document) bring their own
        mask. A given `mask` is used as it is. `is_causal` and "none" are the cheap forms
        scaled_dot_product_attention takes without materialising a mask.
        """
        window = self.cfg.sliding_window
        if cache is None:
            if mask is None:
                if per_row or (window and T > window):
                    mask = self.window_mask(positions, T)
            return _Context(None, slots, start, None, mask, mask is None and T > 1, T)
        if per_row:
            if cache_len is not None:
                length = cache_len
            else:  # a compiled decode step passes its mask, whose last size is symbolic: no host sync, no guard
                length = mask.shape[-1] if mask is not None else int(positions.max()) + 1
            cache.reserve(length)
            return _Context(cache, slots, start, positions,
                            mask if mask is not None else self.window_mask(positions, length), False, length,
                            write_mask)
        length = start + T
        cache.reserve(length)
        cut = bool(window and length > window)  # some key falls outside a query's window
        if mask is None and (T > 1 or cut):
            if start == 0 and not cut:
                return _Context(cache, slots, start, None, None, True, length)
            mask = self.window_mask(positions, length)
        return _Context(cache, slots, start, None, mask, False, length)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | int | None = None, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                logits_index: torch.Tensor | None = None, return_hidden: bool = False,
                cache_len: int | None = None, write_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for token ids idx [B, T].

        input_pos: None (0..T-1), an int start (rows share positions start..start+T-1), or a [B, T] tensor
            of per-row positions (continuous batching, packed documents).
        cache: a KVCache; `slots` [B] picks its rows (default 0..B-1, read as a view). New keys/values are written at
            input_pos and attention covers positions <= each query's.
        mask: explicit bool attention mask [B, 1, T, L] (True = attend), e.g. for packed documents.
        logits_index: [B] position within T per row: return logits [B, 1, V] for that token only.
        cache_len: with per-row positions, max(input_pos) + 1 if the caller knows it (saves a host sync, and
            a graph break under torch.compile); else the mask's last size, else computed from input_pos.
        write_mask: with per-row positions, bool [B]: rows whose keys/values are written; the others leave the
            cache as it was (padding rows of a fixed-size decode batch; their logits mean nothing).
        """
        B, T = idx.shape
        per_row = isinstance(input_pos, torch.Tensor)
        start = 0 if per_row or input_pos is None else int(input_pos)
        positions = input_pos if per_row else torch.arange(start, start + T, device=idx.device)

        x = self.model.embed_tokens(idx)
        cos, sin = self._rope(positions, x.dtype)
        ctx = self._attention_plan(T, positions, per_row, start, cache, slots, mask, cache_len, write_mask)
        for i, layer in enumerate(self.model.layers):
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, ctx, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, ctx, i)
        if logits_index is not None:
            x = x[torch.arange(B, device=idx.device), logits_index][:, None]  # B 1 C
        x = self.model.norm(x)
        if return_hidden:
            return x
        return self.lm_head(x)
