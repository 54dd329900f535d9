"""What a model costs, as pure functions of its ModelConfig: parameters, FLOPs per token, KV-cache and memory bytes.

Stdlib only, so `lmforge.plan` can use it without torch. The training monitor (MFU), the benchmarks and the
planner all call these same functions.

Conventions (PaLM, appendix B; Chinchilla): a matmul with P weights costs 2P FLOPs per token forward and 4P
backward. Attention scores and the weighted sum add 2 * 2 * n_layers * n_heads * head_dim * context forward.
Training counts the full (non-causal) attention term, as PaLM's MFU does: 6N + 12 * L * H * Q * T.
"""

from __future__ import annotations

from lmforge.model.config import ModelConfig


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part. `total` counts tied embeddings once."""
    d, hd, L = cfg.hidden_size, cfg.head_size, cfg.n_layers
    q = d * cfg.n_heads * hd + (cfg.n_heads * hd if cfg.qkv_bias else 0)
    kv = 2 * (d * cfg.n_kv_heads * hd + (cfg.n_kv_heads * hd if cfg.qkv_bias else 0))
    o = cfg.n_heads * hd * d
    mlp = 3 * d * cfg.intermediate_size
    norms = 2 * d
    per_layer = q + kv + o + mlp + norms
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = embed + L * per_layer + d + head
    return {"embedding": embed, "per_layer": per_layer, "layers": L * per_layer, "lm_head": head,
            "total": total, "non_embedding": total - embed - head}


def n_params(cfg: ModelConfig) -> int:
    return param_counts(cfg)["total"]


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every linear layer plus the output head (tied or not)."""
    c = param_counts(cfg)
    return c["non_embedding"] - cfg.n_layers * 2 * cfg.hidden_size - cfg.hidden_size + cfg.vocab_size * cfg.hidden_size


def flops_per_token_forward(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs for one token that attends to `context` positions."""
    return 2 * matmul_params(cfg) + 4 * cfg.n_layers * cfg.n_heads * cfg.head_size * context


def flops_per_token_train(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at sequence length seq_len: 6N + 12 L H Q T."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len


def flops_prefill(cfg: ModelConfig, prompt_len: int) -> float:
    """Forward FLOPs to prefill a prompt (causal: token i attends to i+1 positions)."""
    return 2 * matmul_params(cfg) * prompt_len + 4 * cfg.n_layers * cfg.n_heads * cfg.head_size * prompt_len * (prompt_len + 1) / 2


def flops_per_token_decode(cfg: ModelConfig, context: int) -> float:
    return flops_per_token_forward(cfg, context)


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: float = 2) -> float:
    """KV-cache bytes one token occupies: keys and values for every layer."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_size * bytes_per_value


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, bytes_per_value: float = 2) -> float:
    return kv_bytes_per_token(cfg, bytes_per_value) * context * batch


def weight_bytes(cfg: ModelConfig, bytes_per_param: float = 2) -> float:
    return n_params(cfg) * bytes_per_param


def decode_bytes_per_token(cfg: ModelConfig, bytes_per_param: float = 2, context: int = 0,
                           kv_bytes_per_value: float = 2) -> float:
    """Bytes read from memory per decoded token at batch 1: every weight used once (the embedding table is
    only gathered, one row) plus the KV cache so far. The bandwidth limit on decode is bandwidth / this."""
    c = param_counts(cfg)
    read = (c["total"] - c["embedding"]) * bytes_per_param + cfg.hidden_size * bytes_per_param
    if cfg.tie_embeddings:
        read += c["embedding"] * bytes_per_param  # the tied table is read whole as the output head
    return read + kv_bytes_per_token(cfg, kv_bytes_per_value) * context


def activation_bytes_per_token(cfg: ModelConfig, bytes_per_value: float = 2, checkpointing: bool = False) -> float:
    """Rough activation memory kept for backward, per token (Korthikanti et al. 2022, with flash attention so
    no T^2 term): ~34 * hidden values per layer, or just the layer input with activation checkpointing."""
    per_layer = (2 if checkpointing else 34) * cfg.hidden_size * bytes_per_value / 2
    logits = cfg.vocab_size * 4  # fp32 logits for the loss
    return cfg.n_layers * per_layer + logits


def training_memory_bytes(cfg: ModelConfig, tokens_per_step: int, method: str = "full", shards: int = 1,
                          param_bytes: float = 2, lora_params: int = 0, checkpointing: bool = False) -> dict[str, float]:
    """Memory per device for a training step with AdamW in mixed precision.

    full:  bf16 weights + bf16 grads + fp32 master weights and two fp32 moments (2+2+12 = 16 bytes/param)
    lora:  frozen weights at param_bytes; adapters trained as in full
    qlora: frozen weights at 4 bits (0.5 bytes/param, plus ~3% for quantization constants)
    `shards` divides the sharded parts (FSDP/ZeRO-3) across devices.
    """
    n = n_params(cfg)
    if method == "full":
        weights, grads, optim = n * param_bytes, n * param_bytes, n * 12
    elif method in ("lora", "qlora"):
        frozen = n * (0.5 * 1.03 if method == "qlora" else param_bytes)
        weights, grads, optim = frozen + lora_params * param_bytes, lora_params * param_bytes, lora_params * 12
    else:
        raise ValueError(f"unknown method {method!r}; use full, lora or qlora")
    acts = activation_bytes_per_token(cfg, checkpointing=checkpointing) * tokens_per_step
    parts = {"weights": weights / shards, "gradients": grads / shards, "optimizer": optim / shards,
             "activations": acts}
    parts["total"] = sum(parts.values())
    return parts


def lora_param_count(cfg: ModelConfig, rank: int, targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")) -> int:
    """Adapter parameters for LoRA of `rank` on the named projections of every layer: r * (in + out) each."""
    d, hd, inter = cfg.hidden_size, cfg.head_size, cfg.intermediate_size
    shapes = {"q": (d, cfg.n_heads * hd), "k": (d, cfg.n_kv_heads * hd), "v": (d, cfg.n_kv_heads * hd),
              "o": (cfg.n_heads * hd, d), "gate": (d, inter), "up": (d, inter), "down": (inter, d)}
    return cfg.n_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
