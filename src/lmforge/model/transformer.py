"""The Llama-family decoder: RMSNorm, RoPE (with Llama 3.1 scaling), grouped-query attention through
scaled_dot_product_attention, SwiGLU MLP, and a preallocated KV cache. Nothing else: LoRA, quantization,
parallelism and checkpoints wrap or load this model from outside.

Module names follow Hugging Face's Llama layout (model.layers.N.self_attn.q_proj, ...) so that a state dict
maps 1:1 onto model.safetensors and PEFT adapter keys line up; checkpoint.py still owns the translation of
config.json. Weights use HF's rotate-half RoPE convention, so HF checkpoints load with no permutation.

Shapes: B batch, T new tokens, L attended length, H query heads, K kv heads, D head_dim, C hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies (RoFormer, Su et al. 2021), with Llama 3.1's band-wise scaling if configured."""
    d = cfg.hd
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
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
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated keys and values, one [slots, K, max_len, D] pair per layer.

    Each slot holds one sequence. A forward with `input_pos` writes its new keys/values at those positions
    and attends to positions <= its own, so stale entries from a slot's previous occupant are never read.
    """

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device=None, dtype=torch.float32):
        shape = (slots, cfg.n_kv_heads, max_len, cfg.hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.slots, self.max_len = slots, max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.n_heads * cfg.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, ctx: _Context, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # B H T D
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # B K T D
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx.cache is not None:
            k, v = ctx.write_and_read(layer, k, v)  # B K L D
        if self.n_kv != self.n_heads:
            if _HAS_GQA:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal,
                                                   enable_gqa=True)
            else:  # torch < 2.5
                rep = self.n_heads // self.n_kv
                y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                   attn_mask=ctx.mask, is_causal=ctx.is_causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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

    def __init__(self, cache, slots, start, pos, mask, is_causal, length):
        self.cache, self.slots, self.start, self.pos = cache, slots, start, pos
        self.mask, self.is_causal, self.length = mask, is_causal, length

    def write_and_read(self, layer, k, v):
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        if self.pos is None:  # contiguous positions start..start+T for rows 0..B-1
            B, T = k.shape[0], k.shape[2]
            kc[:B, :, self.start:self.start + T] = k
            vc[:B, :, self.start:self.start + T] = v
            return kc[:B, :, :self.length], vc[:B, :, :self.length]
        B = k.shape[0]
        if self.slots is None:  # rows 0..B-1: read a view, not a gathered copy of the cache (decode speed)
            rows = torch.arange(B, device=k.device)[:, None]
            kc[rows, :, self.pos] = k.transpose(1, 2)  # index dims first: B T K D
            vc[rows, :, self.pos] = v.transpose(1, 2)
            return kc[:B, :, :self.length], vc[:B, :, :self.length]
        rows = self.slots[:, None]  # B 1
        kc[rows, :, self.pos] = k.transpose(1, 2)
        vc[rows, :, self.pos] = v.transpose(1, 2)
        return kc[self.slots, :, :self.length], vc[self.slots, :, :self.length]


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
        # a plain attribute, not a buffer: Module.to(bfloat16) must not round the rotary frequencies
        self.inv_freq = rope_inv_freq(cfg)
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

    def new_cache(self, slots: int, max_len: int | None = None, dtype=None) -> KVCache:
        max_len = max_len or self.cfg.max_seq_len
        w = self.model.embed_tokens.weight  # lm_head may be swapped out (quantization)
        return KVCache(self.cfg, slots, max_len, device=w.device, dtype=dtype or w.dtype)

    # ---- forward ------------------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # B T D/2 (or T D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        if cos.dim() == 2:
            return cos[None, None], sin[None, None]  # 1 1 T D
        return cos[:, None], sin[:, None]  # B 1 T D

    def _window_mask(self, q_pos: torch.Tensor, L: int) -> torch.Tensor:
        """Bool mask [B or 1, 1, T, L]: key j visible from query position p iff p - window < j <= p."""
        j = torch.arange(L, device=q_pos.device)
        qp = q_pos[..., None]  # (B) T 1
        ok = j <= qp
        if self.cfg.sliding_window and L > self.cfg.sliding_window:
            ok = ok & (j > qp - self.cfg.sliding_window)
        return ok[:, None] if ok.dim() == 3 else ok[None, None]

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | int | None = None, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                logits_index: torch.Tensor | None = None, return_hidden: bool = False,
                cache_len: int | None = None) -> torch.Tensor:
        """Logits [B, T, V] for token ids idx [B, T].

        input_pos: None (0..T-1), an int start (rows share positions start..start+T-1), or a [B, T] tensor
            of per-row positions (continuous batching, packed documents).
        cache: a KVCache; `slots` [B] picks its rows (default 0..B-1, read as a view). New keys/values are written at
            input_pos and attention covers positions <= each query's.
        mask: explicit bool attention mask [B, 1, T, L] (True = attend), e.g. for packed documents.
        logits_index: [B] position within T per row: return logits [B, 1, V] for that token only.
        cache_len: with per-row positions, max(input_pos) + 1 if the caller knows it (saves a host sync, and
            a graph break under torch.compile); computed from input_pos otherwise.
        """
        B, T = idx.shape
        dev = idx.device
        pos_tensor = None
        start = 0
        if isinstance(input_pos, torch.Tensor):
            pos_tensor = input_pos
        elif input_pos is not None:
            start = int(input_pos)
        positions = pos_tensor if pos_tensor is not None else torch.arange(start, start + T, device=dev)
        x = self.model.embed_tokens(idx)
        cos, sin = self._rope(positions, x.dtype)

        is_causal = False
        length = T
        if cache is not None:
            if pos_tensor is not None or slots is not None:
                if pos_tensor is None:
                    pos_tensor = positions[None].expand(B, T)
                length = cache_len if cache_len is not None else int(pos_tensor.max()) + 1
            else:
                length = start + T
            if length > cache.max_len:
                raise ValueError(f"sequence of {length} positions exceeds the KV cache ({cache.max_len})")
            if mask is None:
                if pos_tensor is not None:
                    mask = self._window_mask(pos_tensor, length)
                elif T > 1 or (self.cfg.sliding_window and length > self.cfg.sliding_window):
                    if start == 0 and not (self.cfg.sliding_window and length > self.cfg.sliding_window):
                        is_causal = True
                    else:
                        mask = self._window_mask(positions, length)
        elif mask is None:
            if pos_tensor is not None:
                mask = self._window_mask(pos_tensor, T)
            elif self.cfg.sliding_window and T > self.cfg.sliding_window:
                mask = self._window_mask(positions, T)
            else:
                is_causal = T > 1
        ctx = _Context(cache, slots, start, pos_tensor if cache is not None else None, mask, is_causal, length)

        for i, layer in enumerate(self.model.layers):
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, ctx, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, ctx, i)
        if logits_index is not None:
            x = x[torch.arange(B, device=dev), logits_index][:, None]  # B 1 C
        x = self.model.norm(x)
        if return_hidden:
            return x
        return self.lm_head(x)
