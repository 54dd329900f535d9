"""torch.compile for training: when it pays (the rule every recipe shares), and how (by region).

How. Each transformer block is compiled on its own (`compile_blocks`): the blocks are identical, so Dynamo
compiles the code once and reuses it for all of them, while the embedding, the fused loss and the optimizer stay
eager. Inductor fuses the elementwise work around the matmuls (RMSNorm, RoPE, SwiGLU, autocast's dtype casts, the
LoRA additions). Compiled kernels persist across runs in lmforge's compile cache (model/compile_cache.py, shared
with inference), so a second run of the same shapes starts warm. Evaluation and sampling run eagerly
(`eager()`): their shapes differ from training's, and compiling them would cost more than it saves.

When. `TrainConfig.compile` is None by default ("auto"): compile when the run's step budget reaches the measured
break-even (`BREAK_EVEN_STEPS`): cold compile time / per-step gain, measured on the presets (docs/pretrain.md,
"Compiled training"). The rule uses the configuration only, never a timing, so the same command always makes the
same choice (and reproduces the same losses). A run bounded by time alone compiles when its limit exceeds
`BREAK_EVEN_SECONDS`. On a CPU that runs lmforge's eager training kernels, a model `CPU_COMPILE_MAX_WIDTH` wide
or wider trains eagerly whatever its budget: compiled blocks are no faster there. --compile / --no-compile decide
it outright; without either, the environment variable
LMFORGE_COMPILE=0 (or 1) does, for every run of the process and its children (the test suite sets 0, so only the
tests that ask for compiling compile).

On CPU Inductor needs a C++ compiler; without one, `compile_blocks` says so and leaves the model eager.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.model import cpu_kernels
from lmforge.model.compile_cache import use_compile_cache

# Break-even points of a cold compile (docs/pretrain.md, "Compiled training"). CPU, measured on 2 cores with
# benchmarks/bench_train.py, preset tiny: 28.5 s compile / 25 ms saved per step = 1,133 steps (~400 s of eager
# training) when both attended through bf16 matmuls, 27.9 s / 69 ms = 403 steps once eager had lmforge's
# training kernels (a noisy figure: compiled tiny ran 6,459-7,645 tokens/s in one run); the rule keeps the longer.
# Wider models: see CPU_COMPILE_MAX_WIDTH. With the cache warm it is ~2 s: 22-40 steps. CUDA: an estimate until
# benchmarks/gpu_check.sh measures it (one block compiles in ~20-40 s; steps take ~0.1 s).
BREAK_EVEN_STEPS = {"cpu": 1000, "cuda": 1000}
BREAK_EVEN_SECONDS = {"cpu": 360.0, "cuda": 300.0}
# On CPUs that run lmforge's eager training kernels (model/cpu_kernels.cpp: attention's softmax, RMSNorm, SwiGLU,
# RoPE), compiled blocks gain nothing from this width up (bench_train, preset small, hidden 512: eager 1,835
# tokens/s, compiled 1,780 with the cache warm; SmolLM2-135M SFT, hidden 576: full 276 vs 261, LoRA 328 vs 333),
# while preset tiny (hidden 256) still gains 1.16-1.25x: Inductor saves per-op overhead, which matters only on
# small tensors.
CPU_COMPILE_MAX_WIDTH = 512


def cpu_compiler() -> str | None:
    """The C++ compiler Inductor would use on CPU, or None."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def decide(pref: bool | None, device: torch.device, steps: int | None, seconds: float | None = None,
           width: int | None = None) -> tuple[bool, str]:
    """(compile?, why) for a run of at most `steps` optimizer steps (None: unknown) or `seconds` of training, of a
    model `width` wide (hidden size; None: unknown).

    pref True/False (--compile / --no-compile) wins; None applies the break-even rule for the device type, and on
    a CPU with lmforge's eager training kernels, models `CPU_COMPILE_MAX_WIDTH` wide or wider train eagerly.
    """
    if pref is not None:
        return bool(pref), "--compile" if pref else "--no-compile"
    env = os.environ.get("LMFORGE_COMPILE", "").strip().lower()
    if env in ("0", "1", "false", "true", "no", "yes", "off", "on"):
        on = env in ("1", "true", "yes", "on")
        return on, f"LMFORGE_COMPILE={env}"
    kind = device.type if device.type in BREAK_EVEN_STEPS else "cuda"
    if kind == "cpu" and width is not None and width >= CPU_COMPILE_MAX_WIDTH and cpu_kernels.available():
        return False, (f"a model {width} wide trains as fast eagerly on this CPU (lmforge's training kernels; "
                       f"compiling pays below {CPU_COMPILE_MAX_WIDTH})")
    if steps is not None:
        need = BREAK_EVEN_STEPS[kind]
        if steps >= need:
            return True, f"{steps} steps >= the ~{need}-step break-even of compiling on {kind}"
        return False, f"{steps} steps < the ~{need}-step break-even of compiling on {kind}"
    if seconds is not None:
        need_s = BREAK_EVEN_SECONDS[kind]
        if seconds >= need_s:
            return True, f"a {seconds:g} s budget >= the ~{need_s:g} s break-even of compiling on {kind}"
        return False, f"a {seconds:g} s budget < the ~{need_s:g} s break-even of compiling on {kind}"
    return False, "no step or time budget to weigh compiling against"


def training_cache(device: torch.device, dynamic: bool | None) -> Path:
    """Point Inductor's caches at lmforge's compile cache, training's own folder (model/compile_cache.py: kind
    'train', the device type, dynamic shapes or not); returns the folder (a TORCHINDUCTOR_CACHE_DIR the user set
    wins)."""
    return use_compile_cache(kind="train", device=device.type, dynamic=bool(dynamic))


def compile_blocks(model: torch.nn.Module, device: torch.device, log: Callable[[str], None],
                   dynamic: bool | None = None) -> bool:
    """Compile every transformer block of `model` (a Transformer, or a wrapper whose .module is one) in place,
    with lmforge's persistent compile cache. dynamic: torch.compile's (True for batches whose shapes vary, as
    SFT's and DPO's do, so one graph serves every length instead of a recompile per new one).

    Returns False (model unchanged) when compiling is not possible here.
    """
    if device.type == "cpu" and cpu_compiler() is None:
        log("note: compiling needs a C++ compiler on CPU (g++ or clang++; none found): training eagerly")
        return False
    training_cache(device, dynamic)
    inner = getattr(model, "module", model)
    for block in inner.model.layers:
        block.compile(dynamic=dynamic)
    return True


def maybe_compile(model: torch.nn.Module, pref: bool | None, device: torch.device, steps: int | None,
                  seconds: float | None, log: Callable[[str], None], dynamic: bool | None = None) -> bool:
    """Apply `decide`, log the choice and its reason, and compile the blocks if so; returns whether compiled."""
    cfg = getattr(getattr(model, "module", model), "cfg", None)
    want, why = decide(pref, device, steps, seconds, getattr(cfg, "hidden_size", None))
    if not want:
        if pref is None:
            log(f"training eagerly: {why} (--compile to compile anyway)")
        return False
    done = compile_blocks(model, device, log, dynamic=dynamic)
    if done:
        log(f"compiling the transformer blocks ({why}; --no-compile to train eagerly); cache "
            f"{training_cache(device, dynamic)}")
    return done


def eager() -> Any:
    """A context in which compiled blocks run eagerly (evaluation, sampling: shapes training never sees)."""
    return torch.compiler.set_stance("force_eager")
