"""The compiled decode step: one new token for each of the rows 0..n-1 of the KV cache, as one whole-model program
that AOTInductor compiles ahead of time, with the weights frozen in, into a package kept on disk.

Owns: `CompiledDecode` (batch-size buckets, the Inductor options, the packages and their on-disk cache, warm-up),
`can_compile()` (whether this machine can compile at all) and `batch_buckets`. The Engine calls a CompiledDecode
for every decode step whose batch size has a package loaded; prefill stays eager (its lengths vary, and on CPU it
is compute-bound and already at llama.cpp's speed), and so do batch sizes without a package.

Decisions (measured on this project's 2-core EPYC; figures and commands in docs/serve.md):
- AOTInductor (`torch.export` + `aoti_compile_and_package`), not `torch.compile`: a small model's decode step is
  short enough that the host work around it counts, and torch.compile's per-call path (Dynamo's guards over
  every module attribute, AOTAutograd's wrappers, a tensor made of each symbolic size) cost 0.3-0.8 ms a token.
  A package is called with one list of tensors. Same weights, same Inductor options, alternated in one process
  (27M Llama, 2 threads): fp32 4.19 vs 5.38 ms a step, int8 1.28 vs 2.07; a warm start loads a package in
  0.2-0.5 s, where torch.compile's warm cache took 9-12 s.
- weights frozen (Inductor `freezing`): they are constants of the package, so the C++ GEMM template
  (`max_autotune` with the CPP backend) packs each matrix once in the blocking it tuned for that shape.
  oneDNN's own weight-packing pass is kept out (`_without_onednn_packing`): the template packs plain tensors,
  measured as fast (session 4's A/B in docs/serve.md), and nothing depends on oneDNN's opaque tensor type.
- fp32 projections run on lmforge's own fp32 kernel (model/cpu_kernels.py: weights packed in tiles of 16 output
  columns; `PackedF32Linear` is swapped into the twin that is exported, so the packed copy is what the package
  freezes): at 16 rows a step's matmuls took 6.4-7.0 ms against 16.7 for aten's (MKL), and the C++ GEMM template,
  which autotuning times on cache-hot weights, was up to 1.6x slower than aten's on weights streamed from memory.
  At 1 row the kernel ties the template (27M, alternated in one process: 3.0-4.8 ms a step both) and halves the
  cold compile (34 against 64 s: nothing to autotune). Without the kernels (another CPU, LMFORGE_CPU_KERNELS=0),
  fp32 batches of WIDE_ROWS (8) rows and more use aten's matmuls.
- the price of freezing is memory: each loaded package holds its own packed copy of the weights. Packages are
  loaded while their copies fit in a quarter of the memory available (`frozen_copies_allowed`), batch 1 first;
  the batch sizes beyond that decode eagerly (and say so in the log).
- static shapes but for two sizes: batch sizes are bucketed (1, 2, 4, 8, ..., max_batch), one package each with its
  matmuls tuned for that row count; the cache's capacity (dimension 2 of all 2 x layers cache tensors: one
  symbol, export's `Dim`) and the attended length L (the length of the `keys` input) are dynamic, so neither a
  longer context nor a grown cache recompiles.
- padding rows of a bucket (and rows still prefilling) write nothing to the cache (`write_mask`) and attend to
  one key; their logits are dropped.
- packages live in the compile cache (model/compile_cache.py), under a key of the model's shape, dtype,
  quantization, the Inductor options (thread count included) and a digest of the code they were built from
  (`code_digest`), named by slot count, bucket and a digest of the weights (which they hold); written to a temporary name and renamed, so a killed compile leaves nothing that
  looks whole. A package that fails to load is compiled again.
- export traces a twin of the module tree (`_twin`: new module objects over the same tensors): it swaps the
  parameters of the module it traces for fake tensors while it runs, and a server compiles its larger batch
  sizes in a background thread while the engine's thread runs the model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lmforge.model import cpu_kernels

log = logging.getLogger("lmforge.engine")

INDUCTOR_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "autotune_num_choices_displayed": 0,  # no timing tables on the user's terminal
    "max_autotune_report_choices_stats": False,  # nor the JSON of each choice
}
# From this many rows on, fp32 graphs use aten's matmuls: the C++ GEMM template, which autotuning picks from
# timings on cache-hot weights, was up to 1.6x slower on weights read from memory (27M shape, 2 threads, 8 and 16
# rows: the 2752x512 gate/up matrix 4.7-5.9 GB/s against 7.0-7.6; at 1 row the template is the faster).
WIDE_ROWS = 8
FROZEN_MEMORY_FRACTION = 0.25  # of the available memory, for the packages' copies of the weights


def _without_onednn_packing() -> None:
    """Keep Inductor's oneDNN weight-packing pass out of frozen graphs: it swaps each frozen linear for oneDNN's
    opaque packed tensor, where the C++ GEMM template packs plain tensors itself, as fast. The pass is set up once
    per process from this function, so a no-op in its place is enough (and, should a torch version rename it,
    nothing breaks)."""
    try:
        import torch._inductor.fx_passes.mkldnn_fusion as mkldnn_fusion
    except ImportError:
        return
    if hasattr(mkldnn_fusion, "_mkldnn_weight_pack_init"):
        mkldnn_fusion._mkldnn_weight_pack_init = lambda: None


def weights_digest(model: nn.Module) -> str:
    """A hash of every weight's bytes (part of a package's name: the package holds the weights)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().data)
    return h.hexdigest()


def code_digest() -> str:
    """A hash of the source files whose code a package runs (lmforge's model package and this file), part of the
    compile-cache key: a package built from other lmforge code is never loaded."""
    import hashlib

    import lmforge.model

    h = hashlib.blake2b(digest_size=8)
    for f in sorted(Path(lmforge.model.__file__).parent.glob("*.py")) + [Path(__file__)]:
        h.update(f.read_bytes())
    return h.hexdigest()


def frozen_copies_allowed(model: nn.Module, fraction: float = FROZEN_MEMORY_FRACTION) -> int:
    """How many packages (each holds its own packed copy of the weights) fit in `fraction` of the memory still
    available; the batch sizes beyond that decode eagerly."""
    from lmforge.model.memory import available_bytes
    from lmforge.model.quantize import weight_bytes

    free = available_bytes(next(model.parameters()).device)
    size = max(weight_bytes(model), 1)
    return 0 if free is None else int(free * fraction // size)


def can_compile(device: torch.device) -> str | None:
    """None when the decode step can be compiled here; else why not (a sentence for the user)."""
    if device.type != "cpu":
        return None
    import shutil

    if not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        return "compiling the decode step on CPU needs a C++ compiler (g++ or clang++) and none was found"
    return None


def batch_buckets(max_batch: int) -> list[int]:
    """Row counts with a package of their own: powers of two below max_batch, and max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def describe_weights(model: nn.Module) -> str:
    """What the weights are, for the compile-cache key: dtype and the kinds of projection (quantized or not)."""
    kinds = sorted({type(m).__name__ + (f"-g{m.group_size}-{m.packing}" if hasattr(m, "group_size") else "")
                    for m in model.modules() if type(m).__name__.endswith("Linear")})
    return ",".join(kinds)


def _twin(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose modules are new objects over the very same parameters and buffers."""
    twin = copy.copy(module)
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    twin._modules = {k: None if m is None else _twin(m) for k, m in module._modules.items()}
    return twin


def _pack_f32_linears(twin: nn.Module) -> None:
    """Swap the twin's fp32 nn.Linears (the output head too) for copies packed for lmforge's fp32 kernel. Only the
    twin changes: the package freezes the packed copies, the model keeps its own weights for prefill."""
    for module in twin.modules():
        for name, child in module._modules.items():
            if child is not None and cpu_kernels.PackedF32Linear.fits(child):
                module._modules[name] = cpu_kernels.PackedF32Linear(child)


class _CacheViews:
    """What Transformer.forward needs of a KVCache, over the cache tensors a package is given."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v

    def reserve(self, length: int) -> None:
        """The caller has reserved room for `length` positions before the call."""


class _Step(nn.Module):
    """The exported program: logits [Bb, V] = step(rows [3, Bb], keys [L], k_0..k_n-1, v_0..v_n-1).

    rows holds each row's token, position and whether it is live (0/1); `keys` is any tensor whose length is the
    attended length L (its values are never read): a size is how a dynamic length enters an exported program."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, rows: torch.Tensor, keys: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor]):
        torch._check(keys.shape[0] <= k[0].shape[2])  # the caller reserved room for L positions
        tokens, pos = rows[0][:, None], rows[1][:, None]  # Bb 1
        mask = self.model.window_mask(pos, keys.shape[0])  # Bb 1 1 L
        return self.model(tokens, input_pos=pos, cache=_CacheViews(k, v), mask=mask,
                          write_mask=rows[2] != 0)[:, -1]


_COMPILING = threading.Lock()  # held while a package compiles (Inductor's configuration is process-wide)
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {threads: CompiledDecode}


class CompiledDecode:
    """decode(cache, tokens, positions, live, buckets) -> logits [n, V] for cache rows 0..n-1, compiled.

    One per model and thread count (`for_model`), shared by the engines built over that model in a process
    (eval builds one per run), so its packages are loaded once. Packages keep the weights they were compiled
    with: a model changed in place afterwards (training it further) needs a CompiledDecode of its own (serve,
    chat, eval and compare only ever decode models they loaded)."""

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
        self.options["cpp.threads"] = threads
        self.options["cpp.dynamic_threads"] = dynamic_threads
        w = model.model.embed_tokens.weight
        self.device = w.device
        quant = describe_weights(model)
        # packages call lmforge's CPU kernels (the decode attention's on every CPU that has them, int4's for layers in
        # its packing): they load first, and the packages link them
        self.kernels = w.device.type == "cpu" and cpu_kernels.available()
        # fp32 projections on lmforge's fp32 kernel (a quantized model has none left)
        self.f32 = self.kernels and any(map(cpu_kernels.PackedF32Linear.fits, model.modules()))
        self.frozen_copies = frozen_copies_allowed(model)  # packages that may be loaded at once
        self.cache_dir = use_compile_cache(
            kind="decode", dtype=str(w.dtype).removeprefix("torch."),
            quantize="int4" if "Int4" in quant else "int8" if "Int8" in quant else "none",
            model=dataclasses.asdict(model.cfg), weights=quant, options=self.options, code=code_digest(),
            f32_kernel=self.f32)
        self._digest: str | None = None  # of the weights, computed at the first package
        self.graphs: dict[tuple[int, int], object] = {}  # (slots, bucket) -> the loaded package's runner
        self.compiled = 0  # packages this object compiled (the others came from disk)

    def inductor_options(self, dtype: torch.dtype, bucket: int) -> dict:
        """The Inductor options a bucket's package is compiled with (see WIDE_ROWS; lmforge's CPU kernels are
        called through their C functions)."""
        options = dict(self.options)
        if dtype == torch.float32 and bucket >= WIDE_ROWS:
            options["max_autotune_gemm_backends"] = "ATEN"
        if self.kernels:
            options.update(cpu_kernels.aoti_options())
        return options

    def is_warm(self, slots: int, bucket: int) -> bool:
        """Whether the package for this slot count and bucket is loaded."""
        return (slots, bucket) in self.graphs

    def __call__(self, cache, tokens: Sequence[int], positions: Sequence[int], live: Sequence[bool],
                 buckets: Sequence[int]) -> torch.Tensor:
        """Logits [n, V] for rows 0..n-1 of `cache`: row i feeds tokens[i] at positions[i]; rows with live[i] False
        write nothing to the cache (their logits mean nothing). n is padded up to the next of `buckets`."""
        n = len(tokens)
        pad = next(b for b in buckets if b >= n) - n
        L = max(positions) + 1
        cache.reserve(L)  # grows outside the package (the capacity is dynamic in it)
        rows = torch.tensor([[*tokens, *[0] * pad], [*positions, *[0] * pad], [*map(int, live), *[0] * pad]],
                            device=self.device)
        keys = torch.empty(L, dtype=torch.uint8, device=self.device)
        logits = self.graphs[cache.slots, n + pad].boxed_run([rows, keys, *cache.k, *cache.v])[0]  # Bb V
        return logits[:n] if pad else logits

    def warmup(self, slots: int, buckets: Sequence[int], dtype: torch.dtype) -> float:
        """Load the package of every bucket for a cache of `slots` slots, compiling those not on disk yet (batch 1
        first), while memory allows; returns the seconds it took."""
        t = time.perf_counter()
        todo = [b for b in buckets if (slots, b) not in self.graphs]
        for i, b in enumerate(todo):
            if len(self.graphs) >= self.frozen_copies:
                log.info("not enough memory for another copy of the weights: batches of %s rows decode eagerly",
                         ", ".join(map(str, todo[i:])))
                break
            try:
                self._load(slots, b, dtype)
            except Exception as e:  # a model export or Inductor cannot take: slower, but it still answers
                log.warning("compiling the decode step failed (%s: %s): batches of %s rows decode eagerly",
                            type(e).__name__, e, ", ".join(map(str, todo[i:])), exc_info=log.isEnabledFor(logging.DEBUG))
                break
        dt = time.perf_counter() - t
        if todo:
            log.info("compiled decode for batch sizes %s in %.1f s (%d compiled, the rest loaded; compile cache %s)",
                     todo, dt, self.compiled, self.cache_dir)
        return dt

    def _load(self, slots: int, bucket: int, dtype: torch.dtype) -> None:
        with _COMPILING:
            if self._digest is None:
                self._digest = weights_digest(self.model)
            path = self.cache_dir / f"decode-{slots}x{bucket}-{self._digest}.pt2"
            if self.kernels:
                cpu_kernels.load()
            if path.exists():
                try:
                    self.graphs[slots, bucket] = torch._inductor.aoti_load_package(str(path)).loader
                    return
                except Exception as e:  # damaged, or written by another build: compile it again
                    log.warning("compiled decode package %s did not load (%s); compiling it again", path, e)
            self._compile(slots, bucket, dtype, path)
            self.graphs[slots, bucket] = torch._inductor.aoti_load_package(str(path)).loader

    def _compile(self, slots: int, bucket: int, dtype: torch.dtype, path: Path) -> None:
        from lmforge.model.transformer import KVCache

        cfg = self.model.cfg
        top = cfg.max_seq_len
        capacity = min(top, 32)
        scratch = KVCache(cfg, slots, top, device=self.device, dtype=dtype, capacity=capacity)
        rows = torch.zeros(3, bucket, dtype=torch.long, device=self.device)
        keys = torch.empty(capacity // 2 + 1, dtype=torch.uint8, device=self.device)
        cap, length = torch.export.Dim("capacity", min=2, max=top), torch.export.Dim("length", min=1, max=top)
        n = cfg.n_layers
        shapes = {"rows": None, "keys": {0: length}, "k": [{2: cap}] * n, "v": [{2: cap}] * n}
        with torch.no_grad():
            twin = _twin(self.model)
            if self.f32:
                _pack_f32_linears(twin)
            program = torch.export.export(_Step(twin), (rows, keys, scratch.k, scratch.v),
                                          dynamic_shapes=shapes, strict=False)
        _without_onednn_packing()
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.pt2")
        try:
            with warnings.catch_warnings(), (cpu_kernels.linking() if self.kernels else contextlib.nullcontext()):
                warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation notices: not the user's to act on
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                         inductor_configs=self.inductor_options(dtype, bucket))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.compiled += 1
