"""Throughput and model FLOPs utilisation (MFU, PaLM appendix B).

MFU = (tokens/s per device) x (training FLOPs per token) / (peak FLOP/s of one device). FLOPs per token come
from lmforge.model.accounting.flops_per_token_train, the same function the planner and the benchmarks use, so
the three agree. The peak (`peak_flops`) is, in this order: configured (--train.peak_flops), the datasheet's
dense bf16 tensor-core peak of a known CUDA GPU (`GPU_BF16_PEAKS`, the convention MFU figures are quoted in),
or measured once at start by `measure_peak_flops`: the best rate of a square matmul in the training dtype,
which is what the hardware actually delivers to this process (on a shared 2-core CPU, far from any datasheet).
"""

from __future__ import annotations

import time

import torch

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name(); first match
# wins, so the more specific names come first. The same datasheet figures as lmforge/plan/prices.yaml's GPUs.
GPU_BF16_PEAKS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12),
    ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 125e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
)


def datasheet_peak(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a CUDA device by name (GPU_BF16_PEAKS), or None when unknown."""
    for key, flops in GPU_BF16_PEAKS:
        if key.lower() in device_name.lower():
            return flops
    return None


def peak_flops(device: torch.device, dtype: torch.dtype | None, configured: float | None = None) -> float:
    """The peak FLOP/s MFU divides by: configured, else a known GPU's datasheet bf16 peak (when training in bf16),
    else measured (`measure_peak_flops`)."""
    if configured:
        return configured
    if device.type == "cuda" and dtype is not None:
        known = datasheet_peak(torch.cuda.get_device_name(device))
        if known:
            return known
    return measure_peak_flops(device, dtype)


def measure_peak_flops(device: torch.device, dtype: torch.dtype | None = None, size: int | None = None,
                       seconds: float = 0.5) -> float:
    """Best observed FLOP/s of a [size x size] @ [size x size] matmul in `dtype` (fp32 when None) on `device`."""
    dtype = dtype or torch.float32
    size = size or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device=device).manual_seed(0)  # private: the training RNG stream stays untouched
    a = torch.randn(size, size, device=device, generator=g).to(dtype)
    b = torch.randn(size, size, device=device, generator=g).to(dtype)
    flops = 2.0 * size ** 3

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm up kernels and caches
    sync()
    best, start = 0.0, time.perf_counter()
    reps = 0
    while reps < 3 or (time.perf_counter() - start < seconds and reps < 200):
        t = time.perf_counter()
        a @ b
        sync()
        best = max(best, flops / max(time.perf_counter() - t, 1e-9))
        reps += 1
    return best


def fastest_thread_count(max_threads: int | None = None, seconds: float = 0.3) -> int:
    """CPU threads that run a training-like op mix fastest here and now: 1 or the core count (torch's default).

    On a shared machine, two threads whose partner core is busy run slower than one (every parallel op waits
    for the descheduled thread: measured 2-8x on this project's 2-core box); on an idle one they are faster.
    The op mix is small matmuls plus elementwise work, the shape of a small model's step.
    """
    n = max_threads or torch.get_num_threads()
    if n <= 1:
        return 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 256, generator=g)
    w = torch.randn(256, 768, generator=g).to(torch.bfloat16)
    before = torch.get_num_threads()

    def rate(threads: int) -> float:
        torch.set_num_threads(threads)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            y = (x.to(torch.bfloat16) @ w).float()
            y = torch.nn.functional.silu(y) * y
            (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)).sum()
            done += 1
        return done / (time.perf_counter() - start)  # sustained rate, not a lucky best

    try:
        rate(n)  # warm up
        one, many = rate(1), rate(n)
    finally:
        torch.set_num_threads(before)
    return n if many > one else 1


class Throughput:
    """Tokens/s and MFU over the interval since the last `rate()` call, plus running totals."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, world_size: int = 1):
        self.flops_per_token, self.peak, self.world = flops_per_token, peak_flops, world_size
        self.tokens_total = 0
        self.seconds_total = 0.0
        self._tokens = 0
        self._seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        """Record one optimizer step of `tokens` (global) that took `seconds` of training time."""
        self._tokens += tokens
        self._seconds += seconds
        self.tokens_total += tokens
        self.seconds_total += seconds

    def rate(self) -> dict:
        """{"tokens_per_s", "mfu"} since the previous call (mfu None without a peak)."""
        tps = self._tokens / self._seconds if self._seconds > 0 else 0.0
        self._tokens, self._seconds = 0, 0.0
        return {"tokens_per_s": tps, "mfu": self.mfu(tps)}

    def mfu(self, tokens_per_s: float) -> float | None:
        if not self.peak:
            return None
        return tokens_per_s / self.world * self.flops_per_token / self.peak

    @property
    def flops_total(self) -> float:
        return self.tokens_total * self.flops_per_token
