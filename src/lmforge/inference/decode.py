"""The compiled decode step: one new token for each of the rows 0..n-1 of the KV cache, as one whole-model graph
that Inductor compiles with the weights frozen in.

Owns: `CompiledDecode` (batch-size buckets, the Inductor options, the persistent compile-cache key, warm-up),
`can_compile()` (whether this machine can compile at all) and `batch_buckets`. The Engine calls a CompiledDecode
for every decode step when compiling is on; prefill stays eager (its lengths vary, and on CPU it is compute-bound
and already at llama.cpp's speed).

Decisions (measured on this project's 2-core Xeon; figures and commands in docs/serve.md):
- whole model, fullgraph, weights frozen (Inductor `freezing`): the weights become constants, so the C++ GEMM
  template (`max_autotune` with the CPP backend) packs each matrix once in the blocking it tuned for that shape,
  and the C++ wrapper (`cpp_wrapper`) drops the Python glue between kernels. Eager batch-1 F.linear streams the
  weights at about half of what one core can read; the frozen, autotuned step streams them at nearly all of it.
- static shapes, but for the attended length: batch sizes are bucketed (1, 2, 4, 8, ..., max_batch), one graph
  each with its matmuls tuned for that row count; the number of keys L (the mask's last size) and the cache
  capacity (dimension 0 of every cache tensor, which grows) are dynamic, so neither a longer context nor a grown
  cache recompiles. `dynamic=True` would make the row count symbolic too, and the GEMM templates then cannot
  specialise.
- padding rows of a bucket (and rows still prefilling) write nothing to the cache (`write_mask`) and attend to
  one key; their logits are dropped.
- oneDNN weight prepacking is off (`cpp.weight_prepack`): prepacked (mkldnn) tensors cannot be pickled, which
  makes Inductor bypass its FX graph cache, so every start would compile from scratch; the C++ template packs
  weights itself.
- the compiled code is cached on disk (model/compile_cache.py) under a key of the model's shape, dtype,
  quantization, buckets and thread count: the second start of the same model loads it instead of compiling.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections.abc import Sequence

import torch

log = logging.getLogger("lmforge.engine")

INDUCTOR_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "cpp_wrapper": True,
    "cpp.weight_prepack": False,
}


def can_compile(device: torch.device) -> str | None:
    """None when torch.compile can run here; else why not (a sentence for the user)."""
    if device.type != "cpu":
        return None
    import shutil

    if not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        return "torch.compile on CPU needs a C++ compiler (g++ or clang++) and none was found"
    return None


def batch_buckets(max_batch: int) -> list[int]:
    """Row counts with a graph of their own: powers of two below max_batch, and max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def describe_weights(model: torch.nn.Module) -> str:
    """What the weights are, for the compile-cache key: dtype and the kinds of projection (quantized or not)."""
    kinds = sorted({type(m).__name__ + (f"-g{m.group_size}" if hasattr(m, "group_size") else "")
                    for m in model.modules() if type(m).__name__.endswith("Linear")})
    return ",".join(kinds)


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {threads: CompiledDecode}


class CompiledDecode:
    """decode(cache, tokens, positions, live, buckets) -> logits [n, V] for cache rows 0..n-1, compiled.

    One per model and thread count (`for_model`), shared by the engines built over that model in a process
    (eval builds one per run), so their graphs are compiled once."""

    @classmethod
    def for_model(cls, model, threads: int | None = None, dynamic_threads: bool = False) -> CompiledDecode:
        threads = threads or torch.get_num_threads()
        per_model = _SHARED.setdefault(model, {})
        if (threads, dynamic_threads) not in per_model:
            per_model[threads, dynamic_threads] = cls(model, threads, dynamic_threads)
        return per_model[threads, dynamic_threads]

    def __init__(self, model, threads: int, dynamic_threads: bool = False, options: dict | None = None):
        from lmforge.model.compile_cache import use_compile_cache

        self.model = model
        self.options = dict(INDUCTOR_OPTIONS if options is None else options)
        # the generated kernels keep the thread count they were built with (OpenMP num_threads in the C++), unless
        # dynamic_threads: then they take the caller's team size at run time (the engine's "auto" threads)
        self.threads = threads
        self.options["cpp.threads"] = threads
        self.options["cpp.dynamic_threads"] = dynamic_threads
        w = model.model.embed_tokens.weight
        self.device = w.device
        quant = describe_weights(model)
        self.cache_dir = use_compile_cache(
            kind="decode", dtype=str(w.dtype).removeprefix("torch."),
            quantize="int4" if "Int4" in quant else "int8" if "Int8" in quant else "none",
            model=dataclasses.asdict(model.cfg), weights=quant, options=self.options)
        # one graph per bucket (and per slot count), plus room for a recompile or two
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 256)

        def step(tokens, pos, mask, write_mask, kv):
            return model(tokens, input_pos=pos, cache=kv, mask=mask, write_mask=write_mask)[:, -1]

        self._fn = torch.compile(step, fullgraph=True, dynamic=False, options=self.options)
        self.warm: set[tuple[int, int, int]] = set()  # (slots, bucket, threads) compiled so far

    def is_warm(self, slots: int, bucket: int, threads: int | None = None) -> bool:
        """Whether the graph for this slot count and bucket is compiled (at `threads`; default: at any count)."""
        if threads is None:
            return any(w[:2] == (slots, bucket) for w in list(self.warm))
        return (slots, bucket, threads) in self.warm

    @torch.inference_mode()
    def __call__(self, cache, tokens: Sequence[int], positions: Sequence[int], live: Sequence[bool],
                 buckets: Sequence[int]) -> torch.Tensor:
        """Logits [n, V] for rows 0..n-1 of `cache`: row i feeds tokens[i] at positions[i]; rows with live[i] False
        write nothing to the cache (their logits mean nothing). n is padded up to the next of `buckets`."""
        n = len(tokens)
        pad = next(b for b in buckets if b >= n) - n
        dev = self.device
        L = max(positions) + 1
        cache.reserve(L)  # grows outside the graph (dimension 0 is dynamic in it)
        tok = torch.tensor(list(tokens) + [0] * pad, device=dev)[:, None]
        pos = torch.tensor(list(positions) + [0] * pad, device=dev)[:, None]
        write = torch.tensor(list(live) + [False] * pad, device=dev)
        mask = self.model.window_mask(pos, L)  # Bb 1 1 L
        torch._dynamo.mark_dynamic(mask, 3)
        for t in cache.k + cache.v:
            if not hasattr(t, "_dynamo_dynamic_indices"):
                torch._dynamo.mark_dynamic(t, 0)
        logits = self._fn(tok, pos, mask, write, cache)
        return logits[:n] if pad else logits

    def warmup(self, slots: int, buckets: Sequence[int], dtype: torch.dtype,
               thread_counts: Sequence[int] = ()) -> float:
        """Compile (or load from the compile cache) the graph of every bucket for a cache of `slots` slots, at each
        of `thread_counts` (Dynamo keys its graphs by torch's thread count too; default: the current one); returns
        the seconds it took. Runs on a scratch cache: a live one keeps what it holds."""
        from lmforge.inference.threads import set_threads
        from lmforge.model.transformer import KVCache

        t = time.perf_counter()
        before = torch.get_num_threads()
        todo = [(b, n) for n in (thread_counts or [before]) for b in buckets if (slots, b, n) not in self.warm]
        if todo:
            scratch = KVCache(self.model.cfg, slots, 16, device=self.device, dtype=dtype)
            for b, n in todo:
                set_threads(n)
                self(scratch, [0] * b, [1] * b, [True] * b, buckets)
                self.warm.add((slots, b, n))
            set_threads(before)
        dt = time.perf_counter() - t
        if todo:
            log.info("compiled decode for batch sizes %s in %.1f s (compile cache %s)", todo, dt, self.cache_dir)
        return dt
