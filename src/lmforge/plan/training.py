"""Training and finetuning estimates: FLOPs, GPU-hours, wall-clock, dollars, memory per GPU and whether it fits.

FLOPs (Kaplan et al. 2020; PaLM appendix B): 6·N·D for a full update, N parameters and D tokens. When the shape is
known (a preset) we count as lmforge.model.accounting does: 6 x the matmul weights plus the attention term
12·L·H·Q·T. LoRA and QLoRA skip the weight-gradient matmuls of the frozen weights (2 of the 6), so 4·N·D; the
adapters' own FLOPs are under 1% and ignored. QLoRA also dequantises weights on the fly, which costs time but no
model FLOPs: give it a lower --mfu.
Time: GPU-hours = FLOPs / (peak bf16 FLOP/s x MFU) / 3600; wall-clock divides by the GPU count (perfect scaling;
MFU is where real inefficiency goes). Memory: accounting.training_memory_bytes (AdamW, bf16 weights, fp32 master
weights and moments), per GPU, unsharded (DDP: every GPU holds everything) and sharded over the GPUs (FSDP/ZeRO-3).
A GPU "fits" a job when the total stays under 90% of its memory, leaving room for the CUDA context and fragmentation.
Chinchilla (Hoffmann et al. 2022): compute-optimal training uses about 20 tokens per parameter.
"""

from __future__ import annotations

import math

from lmforge.errors import LmforgeError
from lmforge.model import accounting
from lmforge.plan.prices import Gpu
from lmforge.plan.shape import Shape

CHINCHILLA_TOKENS_PER_PARAM = 20.0
USABLE_MEMORY_FRACTION = 0.9
METHODS = ("full", "lora", "qlora")


def chinchilla_tokens(params: float) -> float:
    """Compute-optimal training tokens for a model of `params` parameters (~20 per parameter)."""
    return CHINCHILLA_TOKENS_PER_PARAM * params


def flops_6nd(params: float, tokens: float) -> float:
    """The classic estimate of training FLOPs: 6 x parameters x tokens."""
    return 6.0 * params * tokens


def training_flops(shape: Shape, tokens: float, seq_len: int, method: str = "full") -> dict[str, float]:
    """Training FLOPs for `tokens` tokens: {total, per_token, attention_per_token, matmul_factor}."""
    if method not in METHODS:
        raise LmforgeError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")
    if tokens <= 0:
        raise LmforgeError(f"the token count must be positive, got {tokens:g}")
    factor = 6.0 if method == "full" else 4.0
    if shape.estimated:  # shape unknown: the plain k·N·D count on the N the user gave
        per_token, attention = factor * shape.params, 0.0
    else:
        cfg = shape.cfg
        attention = 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len
        per_token = factor * accounting.matmul_params(cfg) + attention
    return {"total": per_token * tokens, "per_token": per_token, "attention_per_token": attention,
            "matmul_factor": factor}


def compute_time(flops: float, gpu: Gpu, gpus: int, mfu: float, usd_per_hour: float | None = None) -> dict[str, float]:
    """GPU-hours, wall-clock hours and dollars to do `flops` on `gpus` GPUs at model FLOPs utilisation `mfu`."""
    if not 0 < mfu <= 1:
        raise LmforgeError(f"--mfu is a fraction of peak between 0 and 1 (typical 0.3-0.5), got {mfu}")
    if gpus < 1:
        raise LmforgeError(f"--gpus must be at least 1, got {gpus}")
    if gpu.peak_flops <= 0:
        raise LmforgeError(f"GPU '{gpu.key}' has no bf16_tflops figure; set one with --prices FILE.yaml")
    rate = gpu.usd_per_hour if usd_per_hour is None else usd_per_hour
    gpu_hours = flops / (gpu.peak_flops * mfu) / 3600.0
    return {"gpu_hours": gpu_hours, "wall_hours": gpu_hours / gpus, "usd": gpu_hours * rate,
            "usd_per_gpu_hour": rate, "achieved_tflops_per_gpu": gpu.bf16_tflops * mfu}


def memory(shape: Shape, gpu: Gpu, gpus: int, method: str, micro_batch: int, seq_len: int,
           checkpointing: bool, lora_rank: int = 16) -> dict:
    """Bytes per GPU by part, unsharded and sharded over `gpus`, whether each fits, and the fewest GPUs that fit."""
    if micro_batch < 1 or seq_len < 1:
        raise LmforgeError("--micro-batch and --seq-len must be at least 1")
    lora = accounting.lora_param_count(shape.cfg, lora_rank) if method != "full" else 0
    tokens = micro_batch * seq_len
    usable = gpu.memory_bytes * USABLE_MEMORY_FRACTION

    def parts(shards: int) -> dict[str, float]:
        return accounting.training_memory_bytes(shape.cfg, tokens, method=method, shards=shards,
                                                lora_params=lora, checkpointing=checkpointing)

    unsharded, sharded = parts(1), parts(max(1, gpus))
    shardable = unsharded["total"] - unsharded["activations"]
    room = usable - unsharded["activations"]
    min_gpus = math.ceil(shardable / room) if room > 0 else None  # None: activations alone overflow one GPU
    return {"method": method, "lora_params": lora, "tokens_per_micro_batch": tokens,
            "checkpointing": checkpointing, "gpu_memory_bytes": gpu.memory_bytes, "usable_bytes": usable,
            "unsharded": unsharded, "sharded": sharded, "shards": max(1, gpus),
            "fits_unsharded": unsharded["total"] <= usable, "fits_sharded": sharded["total"] <= usable,
            "min_gpus_sharded": min_gpus}


def memory_advice(mem: dict) -> str:
    """One sentence on what to change when the job does not fit."""
    if mem["fits_unsharded"]:
        return "fits on each GPU without sharding"
    if mem["fits_sharded"]:
        return f"fits only when sharded over {mem['shards']} GPUs (FSDP / ZeRO-3)"
    tips = []
    if mem["min_gpus_sharded"]:
        tips.append(f"shard over at least {mem['min_gpus_sharded']} GPUs")
    if not mem["checkpointing"]:
        tips.append("turn on activation checkpointing")
    if mem["unsharded"]["activations"] > 0.25 * mem["unsharded"]["total"]:
        tips.append("use a smaller --micro-batch or --seq-len")
    if mem["method"] == "full":
        tips.append("finetune with lora or qlora")
    elif mem["method"] == "lora":
        tips.append("use qlora (4-bit frozen weights)")
    tips.append("pick a GPU with more memory")
    return "does not fit: " + "; or ".join(tips)
