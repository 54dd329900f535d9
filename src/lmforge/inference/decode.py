"""The compiled decode step: one new token for each of the rows 0..n-1 of the KV cache, as one whole-model graph
that Inductor compiles with the weights frozen in.

Owns: `CompiledDecode` (batch-size buckets, the Inductor options, the persistent compile-cache key, warm-up),
`can_compile()` (whether this machine can compile at all) and `batch_buckets`. The Engine calls a CompiledDecode
for every decode step when compiling is on; prefill stays eager (its lengths vary, and on CPU it is compute-bound
and already at llama.cpp's speed).

Decisions (measured on this project's 2-core Xeon; figures and commands in docs/serve.md):
- whole model, fullgraph, weights frozen (Inductor `freezing`, switched on globally while Dynamo traces: see
  `_freezing`): the weights become constants, so the C++ GEMM template (`max_autotune` with the CPP backend)
  packs each matrix once in the blocking it tuned for that shape, and the C++ wrapper (`cpp_wrapper`) drops
  the Python glue between kernels. Measured against the same graph with the weights as inputs (aten mm),
  2 threads, alternated: 27M bf16 1 stream 231-375 vs 120-136 tok/s, 8 streams 1,650-1,935 vs 675-1,154;
  SmolLM2 fp32 36-39 vs 29-33.
- fp32 batches of WIDE_ROWS (8) rows and more use aten's matmuls instead of the C++ GEMM template: autotuning
  times the candidates on cache-hot weights and picks the template, which is then up to 1.6x slower on weights
  streamed from memory. With it (and the decode attention of model/transformer.py) the 27M fp32 server gives
  4.2x one stream's tokens/s at 16 streams, 646 against 476 tokens/s before.
- the price of freezing is memory: each frozen graph holds its own packed copy of the weights (27M bf16 with
  4 bucket graphs: RSS 1.0 GB all frozen, 0.7 with batch 1 only). Graphs are frozen while their copies fit in
  a quarter of the memory available (`frozen_copies_allowed`), batch 1 first; the rest read the model's.
- static shapes, but for the attended length: batch sizes are bucketed (1, 2, 4, 8, ..., max_batch), one graph
  each with its matmuls tuned for that row count; the number of keys L (the mask's last size) and the cache
  capacity (dimension 0 of every cache tensor, which grows) are dynamic, so neither a longer context nor a grown
  cache recompiles. `dynamic=True` would make the row count symbolic too, and the GEMM templates then cannot
  specialise.
- padding rows of a bucket (and rows still prefilling) write nothing to the cache (`write_mask`) and attend to
  one key; their logits are dropped.
- the compiled code is cached on disk (model/compile_cache.py) under a key of the model's shape, dtype,
  quantization, buckets and thread count (the frozen graphs' entries also by a digest of the weights, which they
  hold): the second start of the same model loads it instead of compiling. oneDNN's weight-packing pass is
  kept out (`_cacheable_freezing`): its tensors cannot be pickled and would make every start compile again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
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
    "autotune_num_choices_displayed": 0,  # no timing tables on the user's terminal
    "max_autotune_report_choices_stats": False,  # nor the JSON of each choice
}
# From this many rows on, fp32 graphs use aten's matmuls: the C++ GEMM template, which autotuning picks from
# timings on cache-hot weights, was up to 1.6x slower on weights read from memory (27M shape, 2 threads, 8 and 16
# rows: the 2752x512 gate/up matrix 4.7-5.9 GB/s against 7.0-7.6; at 1 row the template is the faster).
WIDE_ROWS = 8
FROZEN_MEMORY_FRACTION = 0.25  # of the available memory, for the frozen graphs' packed copies of the weights


def _cacheable_freezing() -> None:
    """Keep Inductor's oneDNN weight-packing pass out of frozen graphs. It replaces each frozen linear by a
    oneDNN-packed (mkldnn) weight that cannot be pickled, so the FX graph cache is bypassed and every start
    lowers the whole model again (27M bf16: a 34 s warm start instead of 9 s; SmolLM2 fp32: 130 s instead of
    24); without it the GEMM template still packs the constant weights, in plain tensors, and nothing is lost
    in speed. The pass is set up once per process from this function, so a no-op in its place is enough (and,
    should a torch version rename it, nothing breaks but the cache)."""
    try:
        import torch._inductor.fx_passes.mkldnn_fusion as mkldnn_fusion
    except ImportError:
        return
    if hasattr(mkldnn_fusion, "_mkldnn_weight_pack_init"):
        mkldnn_fusion._mkldnn_weight_pack_init = lambda: None


@contextlib.contextmanager
def _freezing(digest: str | None):
    """Inductor's global `freezing` on (digest given) or off around a call of the compiled step.

    Dynamo makes parameters and buffers graph constants (which Inductor then freezes) only when the global flag
    is on while it traces: the `options=` given to torch.compile reach Inductor but not Dynamo, so with options
    alone nothing is frozen and the C++ GEMM template, which needs constant weights, is never chosen. The
    weights' digest goes into the compile-cache keys (`cache_key_tag`): a frozen graph's cache entry holds the
    packed weights, and Inductor keys it by the weights' shapes only, so two models of one shape (a base and its
    finetune) would otherwise load each other's weights. Set and restored by hand (config.patch costs ~20 us a
    step); freezing happens only without grad, so training compiles are never affected."""
    cfg, ccfg = torch._inductor.config, torch.compiler.config
    before = cfg.freezing, ccfg.cache_key_tag
    cfg.freezing = digest is not None
    if digest is not None:
        ccfg.cache_key_tag = f"{before[1]}lmforge-weights-{digest}"
    try:
        yield
    finally:
        cfg.freezing, ccfg.cache_key_tag = before


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of every weight's bytes (the frozen graphs' cache key; see `_freezing`)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().data)
    return h.hexdigest()


def frozen_copies_allowed(model: torch.nn.Module, fraction: float = FROZEN_MEMORY_FRACTION) -> int:
    """How many frozen graphs (each holds its own packed copy of the weights) fit in `fraction` of the memory
    still available; the graphs beyond that read the model's own weights."""
    from lmforge.model.memory import available_bytes
    from lmforge.model.quantize import weight_bytes

    free = available_bytes(next(model.parameters()).device)
    size = max(weight_bytes(model), 1)
    return 0 if free is None else int(free * fraction // size)


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


_COMPILING = threading.Lock()  # held by a call that traces (serve compiles larger batches in a background thread)
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {threads: CompiledDecode}


class CompiledDecode:
    """decode(cache, tokens, positions, live, buckets) -> logits [n, V] for cache rows 0..n-1, compiled.

    One per model and thread count (`for_model`), shared by the engines built over that model in a process
    (eval builds one per run), so their graphs are compiled once. Frozen graphs keep the weights they were
    compiled with: a model changed in place afterwards (training it further) needs a CompiledDecode of its own
    (serve, chat, eval and compare only ever decode models they loaded)."""

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
        # graphs with the weights frozen in: the first ones compiled, while memory allows
        self.frozen_copies = frozen_copies_allowed(model)
        self._frozen: set[tuple[int, int, int]] = set()  # (slots, bucket, threads) of the frozen graphs
        self.cache_dir = use_compile_cache(
            kind="decode", dtype=str(w.dtype).removeprefix("torch."),
            quantize="int4" if "Int4" in quant else "int8" if "Int8" in quant else "none",
            model=dataclasses.asdict(model.cfg), weights=quant, options=self.options)
        self.digest = weights_digest(model) if self.frozen_copies else None
        if self.frozen_copies:
            _cacheable_freezing()
        # one graph per bucket (and per slot count), plus room for a recompile or two
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 256)

        def step(tokens, pos, mask, write_mask, kv):
            return model(tokens, input_pos=pos, cache=kv, mask=mask, write_mask=write_mask)[:, -1]

        self._fn = torch.compile(step, fullgraph=True, dynamic=False, options=self.options)
        # fp32 batches of WIDE_ROWS rows and more: aten's (MKL's) matmuls, not the C++ GEMM template (see WIDE_ROWS)
        self._fn_wide = self._fn if w.dtype != torch.float32 else torch.compile(
            step, fullgraph=True, dynamic=False, options=dict(self.options, max_autotune_gemm_backends="ATEN"))
        self.warm: set[tuple[int, int, int]] = set()  # (slots, bucket, threads) compiled (or loaded) so far

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
        graph = (cache.slots, n + pad, torch.get_num_threads())
        fn = self._fn_wide if n + pad >= WIDE_ROWS else self._fn
        if graph in self.warm:  # the steady state: no tracing, so no flags to set
            logits = fn(tok, pos, mask, write, cache)
        else:  # this call compiles its graph (or loads it): one at a time, as the flags are process-wide
            with _COMPILING:
                freeze = len(self._frozen) < self.frozen_copies
                with _freezing(self.digest if freeze else None):
                    logits = fn(tok, pos, mask, write, cache)
                if freeze:
                    self._frozen.add(graph)
                self.warm.add(graph)
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
        todo = [(b, n) for b in buckets for n in (thread_counts or [before]) if (slots, b, n) not in self.warm]
        if todo:
            scratch = KVCache(self.model.cfg, slots, 16, device=self.device, dtype=dtype)
            for b, n in todo:
                set_threads(n)
                self(scratch, [0] * b, [1] * b, [True] * b, buckets)  # marks (slots, b, n) warm
            set_threads(before)
        dt = time.perf_counter() - t
        if todo:
            log.info("compiled decode for (batch size, threads) %s in %.1f s, weights frozen into %d of them "
                     "(compile cache %s)", todo, dt, len(self._frozen), self.cache_dir)
        return dt
