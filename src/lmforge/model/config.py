"""ModelConfig: the shape of a Llama-family decoder, and named presets. Plain data, stdlib only.

One config covers Llama 2/3 (3.1 RoPE scaling), Mistral, Qwen2/2.5 (QKV bias, YaRN for long context) and
SmolLM/TinyLlama (tied embeddings). What can be derived (the per-head width, the KV group size) is derived, not
stored twice: `head_dim` is the optional stored override (as in config.json), `head_size` the width in use.
checkpoint.py translates to and from Hugging Face's config.json; nothing else knows HF's key names.

`validate()` is the one gate every config passes before anything is allocated (presets, YAML/CLI configs,
config.json): types, ranges, divisibility and the RoPE scaling types the model implements. A config file is
untrusted input, so a wrong type is an LmforgeError naming the field, never a TypeError deep in torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Every size is a count that torch's kernels and HF's configs keep in int32; nothing published comes near it.
MAX_SIZE = 2**31 - 1


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
    def head_size(self) -> int:
        """Width of one attention head: head_dim when config.json gives it, else hidden_size / n_heads."""
        return self.head_dim or self.hidden_size // self.n_heads

    def validate(self, where: str = "model", names: Mapping[str, str] | None = None) -> None:
        """Raise LmforgeError for the first field of the wrong type, out of range, or inconsistent with another.

        where/names say how the message names a field: `model.n_heads` by default (the CLI/YAML spelling), or
        "config.json: num_attention_heads" when checkpoint.py passes its HF names.
        """
        from lmforge.errors import LmforgeError

        def name(f: str) -> str:
            return names.get(f, f) if names is not None else f

        def label(f: str) -> str:
            return f"{where}: {name(f)}" if names is not None else f"{where}.{f}"

        def fail(f: str, what: str) -> None:
            raise LmforgeError(f"{label(f)} must be {what}, got {_show(getattr(self, f))}")

        if self.model_type not in MODEL_TYPES:
            fail("model_type", f"one of {', '.join(MODEL_TYPES)}")
        for f in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "intermediate_size",
                  "max_seq_len"):
            if not _is_int(getattr(self, f), 1, MAX_SIZE):
                fail(f, f"an integer from 1 to {MAX_SIZE}")
        if self.head_dim is not None and not _is_int(self.head_dim, 2, MAX_SIZE):
            fail("head_dim", f"null or an integer from 2 to {MAX_SIZE}")
        if self.sliding_window is not None and not _is_int(self.sliding_window, 1, MAX_SIZE):
            fail("sliding_window", f"null or an integer from 1 to {MAX_SIZE}")
        if not _is_real(self.rope_theta) or not self.rope_theta > 1:
            fail("rope_theta", "a finite number above 1 (the RoPE base, e.g. 10000)")
        if not _is_real(self.norm_eps) or not 0 < self.norm_eps < 1:
            fail("norm_eps", "a number in (0, 1), e.g. 1e-5")
        if not _is_real(self.init_std) or self.init_std < 0:
            fail("init_std", "a finite number >= 0")
        for f in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, f), bool):
                fail(f, "true or false")
        if self.n_heads % self.n_kv_heads:
            raise LmforgeError(f"{label('n_heads')} ({self.n_heads}) must be a multiple of {name('n_kv_heads')} "
                               f"({self.n_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.n_heads:
            raise LmforgeError(f"{label('hidden_size')} ({self.hidden_size}) must be divisible by {name('n_heads')} "
                               f"({self.n_heads}), or {name('head_dim')} must be given")
        if self.head_size % 2:
            raise LmforgeError(f"{label('head_dim')} ({self.head_size}) must be even for rotary embeddings")
        if self.rope_scaling is not None:
            problem = rope_scaling_problem(self.rope_scaling)
            if problem:
                raise LmforgeError(f"{label('rope_scaling')}: {problem}")

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _show(v: Any) -> str:
    text = repr(v)
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(v).__name__})"


def rope_type(scaling: Mapping[str, Any] | None) -> str:
    """The RoPE variant a rope_scaling dict names ("default" for none); HF spells the key rope_type or type."""
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def rope_scaling_problem(rs: Any) -> str | None:
    """What is wrong with a rope_scaling dict, or None. Ranges follow what each formula needs to stay finite."""
    if not isinstance(rs, Mapping):
        return f'must be a JSON object such as {{"rope_type": "llama3", "factor": 8}}, got {_show(rs)}'
    kind = rope_type(rs)
    if kind not in ROPE_TYPES:
        return (f"rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)}); dynamic NTK and "
                "longrope are not implemented")
    if kind == "default":
        return None

    def number(key: str, lo: float, required: bool = False, above: bool = True) -> str | None:
        v = rs.get(key)
        if v is None:
            return f"{key} is required for rope_type {kind}" if required else None
        if not _is_real(v) or (v <= lo if above else v < lo):
            return f"{key} must be a finite number {'above' if above else 'at least'} {lo:g}, got {_show(v)}"
        return None

    checks = [number("factor", 0, required=kind != "yarn")]
    if "original_max_position_embeddings" in rs and not _is_int(rs["original_max_position_embeddings"], 1, MAX_SIZE):
        checks.append(f"original_max_position_embeddings must be a positive integer, "
                      f"got {_show(rs['original_max_position_embeddings'])}")
    if kind == "llama3":
        checks += [number("low_freq_factor", 0), number("high_freq_factor", 0)]
        low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        if not any(checks) and not high > low:  # the smoothing band divides by high - low
            checks.append(f"high_freq_factor ({high}) must exceed low_freq_factor ({low})")
    if kind == "yarn":
        checks += [number("beta_fast", 0, above=False), number("beta_slow", 0, above=False),
                   number("attention_factor", 0), number("mscale", 0, above=False),
                   number("mscale_all_dim", 0, above=False)]
        if rs.get("truncate") is not None and not isinstance(rs["truncate"], bool):
            checks.append(f"truncate must be true or false, got {_show(rs['truncate'])}")
    return next((c for c in checks if c), None)


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
