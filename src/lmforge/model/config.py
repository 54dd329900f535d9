"""ModelConfig: the shape of a Llama-family decoder, and named presets. Plain data, stdlib only.

One config covers Llama 2/3 (3.1 RoPE scaling), Mistral, Qwen2/2.5 (QKV bias) and SmolLM/TinyLlama (tied
embeddings). What can be derived (head_dim, the KV group size) is derived, not stored twice.
checkpoint.py translates to and from Hugging Face's config.json; nothing else knows HF's key names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    model_type: str = field(default="llama", metadata={"help": 'Hugging Face family written to config.json: llama, mistral or qwen2'})
    vocab_size: int = field(default=8192, metadata={"help": 'vocabulary size (embedding rows)'})
    hidden_size: int = field(default=256, metadata={"help": 'width of the residual stream'})
    n_layers: int = field(default=4, metadata={"help": 'number of transformer blocks'})
    n_heads: int = field(default=4, metadata={"help": 'query heads'})
    n_kv_heads: int = field(default=4, metadata={"help": 'key/value heads (grouped-query attention when fewer than n_heads)'})
    intermediate_size: int = field(default=688, metadata={"help": 'SwiGLU hidden width'})
    max_seq_len: int = field(default=512, metadata={"help": 'longest context the model is trained or served with'})
    head_dim: int | None = field(default=None, metadata={"help": 'per-head width; none = hidden_size / n_heads'})
    rope_theta: float = field(default=10000.0, metadata={"help": 'RoPE base frequency'})
    rope_scaling: dict | None = field(default=None, metadata={"help": 'RoPE scaling as JSON, e.g. {"rope_type": "llama3", "factor": 8, ...}'})
    norm_eps: float = field(default=1e-5, metadata={"help": 'RMSNorm epsilon'})
    qkv_bias: bool = field(default=False, metadata={"help": 'bias on the q/k/v projections (Qwen2)'})
    tie_embeddings: bool = field(default=False, metadata={"help": 'share the input embedding with the output head'})
    sliding_window: int | None = field(default=None, metadata={"help": 'attend only to the last N positions (Mistral); none = full attention'})
    init_std: float = field(default=0.02, metadata={"help": 'standard deviation of the random initialisation'})

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.n_heads

    def validate(self) -> None:
        from lmforge.errors import LmforgeError

        if self.n_heads % self.n_kv_heads:
            raise LmforgeError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.n_heads:
            raise LmforgeError(f"hidden_size ({self.hidden_size}) must be divisible by n_heads ({self.n_heads})")
        if self.hd % 2:
            raise LmforgeError(f"head_dim ({self.hd}) must be even for rotary embeddings")
        for name in ("vocab_size", "hidden_size", "n_layers", "intermediate_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise LmforgeError(f"model.{name} must be positive, got {getattr(self, name)}")

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _llama31_scaling(factor: float = 8.0) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


PRESETS: dict[str, ModelConfig] = {
    # tests: about 1M parameters
    "test": ModelConfig(vocab_size=2048, hidden_size=128, n_layers=2, n_heads=4, n_kv_heads=2,
                        intermediate_size=344, max_seq_len=256),
    # the built-in pretrain default: trains in minutes on 2 CPU cores (~6M parameters)
    "tiny": ModelConfig(vocab_size=4096, hidden_size=256, n_layers=6, n_heads=8, n_kv_heads=4,
                        intermediate_size=688, max_seq_len=256, tie_embeddings=True),
    # the benchmark shapes (~27M and ~82M parameters)
    "small": ModelConfig(vocab_size=8192, hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=4,
                         intermediate_size=1376, max_seq_len=1024, tie_embeddings=True),
    "medium": ModelConfig(vocab_size=8192, hidden_size=768, n_layers=12, n_heads=12, n_kv_heads=4,
                          intermediate_size=2048, max_seq_len=1024, tie_embeddings=True),
    # real shapes of published models (shapes only; weights come from their HF directories)
    "smollm-135m": ModelConfig(vocab_size=49152, hidden_size=576, n_layers=30, n_heads=9, n_kv_heads=3,
                               intermediate_size=1536, max_seq_len=2048, tie_embeddings=True),
    "qwen2.5-0.5b": ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=896, n_layers=24, n_heads=14,
                                n_kv_heads=2, intermediate_size=4864, max_seq_len=32768, rope_theta=1e6,
                                norm_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    "tinyllama-1.1b": ModelConfig(vocab_size=32000, hidden_size=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                                  intermediate_size=5632, max_seq_len=2048),
    "llama-2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                              intermediate_size=11008, max_seq_len=4096, norm_eps=1e-5),
    "mistral-7b": ModelConfig(model_type="mistral", vocab_size=32000, hidden_size=4096, n_layers=32, n_heads=32,
                              n_kv_heads=8, intermediate_size=14336, max_seq_len=32768, rope_theta=1e6),
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                              intermediate_size=14336, max_seq_len=8192, rope_theta=500000.0),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                intermediate_size=14336, max_seq_len=131072, rope_theta=500000.0,
                                rope_scaling=_llama31_scaling()),
    "llama-2-70b": ModelConfig(vocab_size=32000, hidden_size=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                               intermediate_size=28672, max_seq_len=4096),
}


def preset(name: str) -> ModelConfig:
    from lmforge.errors import LmforgeError

    if name not in PRESETS:
        raise LmforgeError(f"unknown model preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
