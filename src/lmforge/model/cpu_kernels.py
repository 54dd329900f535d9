"""lmforge's own CPU kernels (cpu_kernels.cpp), on AVX512(-VNNI) CPUs:
  - int4 x int8 dot products (`q4_mm`, and `q4_dequant` for prompts), the way llama.cpp's q4 kernels work: torch's
    int4 CPU kernels dequantize every weight to fp32 and multiply-add, so int4 decode was compute-bound at
    0.70-0.77x llama.cpp's q4_0 on every shape; rounding each 32-value block of activations to int8 turns a block's
    products into one `vpdpbusd`;
  - fp32 weights packed in tiles of 16 output columns (`f32_mm`, `pack_f32`): the batched decode steps of a
    server, where aten's matmul (MKL) at 8-16 rows ran at a third of the machine's multiply-add rate.
  - one-query attention over the KV cache (`decode_attention`): each row's kv head read once for its query heads,
    where two batched matmuls cost 1.3-4x the time (model/transformer.py's decode_attention calls it).
  - training's loss (`xent_grad_`): cross-entropy and its gradient from a chunk of logits in one pass per row, in
    place (training/step.py's fused loss calls it), where log_softmax, exp, the one-hot subtraction and the cast
    back each streamed [tokens, vocab] fp32 tensors through memory;
  - training attention's softmax (`attn_softmax`): the scaled, masked softmax of bf16 scores and its backward in
    one pass per row each (model/transformer.py's training_attention calls it), where the fp32 copy, scaling,
    mask, softmax and cast back each streamed the scores through memory;
  - RMSNorm for eager training (`rms_norm`), forward and backward one pass per row, its output in bf16 under
    autocast (model/transformer.py's RMSNorm calls it), where the square, mean, rsqrt, products and autocast's
    cast for every projection that reads the output streamed fp32 tensors through memory;
  - SwiGLU for eager training (`swiglu`): silu(gate) * up of bf16 projections and its backward in one pass each;
  - RoPE for eager training (`rope`): bf16 queries and keys rotated in one pass, each way, into the bf16 the
    attention matmuls read (unfused: an fp32 result through five ops, then autocast's cast back).

Owns: whether this machine can use them (`available`), building them on first use with the machine's C++ compiler
into lmforge's compile cache (a shared library per source, flags and torch version: a second start only loads it),
loading them (`load`: registers the torch operators `lmforge::lmforge_*` and their shape functions, so eager code
and torch.export both call them), and the Inductor options that let an AOTInductor package call their C functions
directly (`aoti_options`). Quantization (model/quantize.py) decides which layers use the int4 kernel and packs
their weights; the decode packages (inference/decode.py) swap fp32 projections for `PackedF32Linear`.
Only CPUs with AVX512 (F, BW, VL), AVX512-VNNI and F16C; elsewhere torch's kernels are used. LMFORGE_CPU_KERNELS=0
turns them off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

log = logging.getLogger("lmforge.quantize")

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
LIBRARY = "lmforge_cpu"  # liblmforge_cpu.so; AOTInductor packages link it by this name
C_SHIMS = {  # operator -> the C function AOTInductor packages call for it
    "lmforge_q4_mm": "AOTITorchError aoti_torch_cpu_lmforge_q4_mm(AtenTensorHandle x, AtenTensorHandle qweight, "
                     "AtenTensorHandle scales, AtenTensorHandle mins, AtenTensorHandle* ret0)",
    "lmforge_q4_dequant": "AOTITorchError aoti_torch_cpu_lmforge_q4_dequant(AtenTensorHandle qweight, "
                          "AtenTensorHandle scales, AtenTensorHandle mins, AtenTensorHandle* ret0)",
    "lmforge_f32_mm": "AOTITorchError aoti_torch_cpu_lmforge_f32_mm(AtenTensorHandle x, AtenTensorHandle packed, "
                      "AtenTensorHandle* ret0)",
    "lmforge_decode_attention": "AOTITorchError aoti_torch_cpu_lmforge_decode_attention(AtenTensorHandle q, "
                                "AtenTensorHandle k, AtenTensorHandle v, AtenTensorHandle mask, AtenTensorHandle* ret0)",
}
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma")
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
            "-mavx512vnni", "-mf16c", "-mfma"]
_LOCK = threading.Lock()
_loaded: Path | None = None


@functools.cache  # read once: available() is asked on every decode attention call
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def available() -> bool:
    """Whether the kernels can run here: Linux on x86-64 with the CPU features they use, and a C++ compiler to
    build them (LMFORGE_CPU_KERNELS=0 turns them off: torch's kernels are used instead)."""
    if os.environ.get("LMFORGE_CPU_KERNELS", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    return all(f in _cpu_flags() for f in CPU_FLAGS) and _compiler() is not None


def _build_dir() -> Path:
    from lmforge.model.compile_cache import compile_cache_dir

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CXXFLAGS).encode()).hexdigest()[:16]
    return compile_cache_dir(torch.__version__, kind="kernel", name=LIBRARY, source=digest)


def _build(out: Path) -> None:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdirs = cpp_extension.library_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    cmd = [_compiler(), *CXXFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(SOURCE), "-o", str(tmp),
           f"-Wl,-soname,lib{LIBRARY}.so", *[f"-L{d}" for d in libdirs], *[f"-Wl,-rpath,{d}" for d in libdirs],
           "-lc10", "-ltorch_cpu"]
    log.info("building lmforge's CPU kernels (once per torch version): %s", out)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE.name} failed:\n{done.stderr[-3000:]}")
    os.replace(tmp, out)


def load() -> Path:
    """Build (first time) and load the kernels; returns the library's path. Idempotent and thread-safe."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _LOCK:
        if _loaded is None:
            path = _build_dir() / f"lib{LIBRARY}.so"
            if not path.exists():
                _build(path)
            torch.ops.load_library(str(path))

            @torch.library.register_fake("lmforge::lmforge_q4_mm")
            def _(x, qweight, scales, mins):
                return x.new_empty((x.shape[0], 16 * qweight.shape[0]), dtype=torch.float32)

            @torch.library.register_fake("lmforge::lmforge_q4_dequant")
            def _(qweight, scales, mins):
                return qweight.new_empty((16 * qweight.shape[0], qweight.shape[1] // 8), dtype=torch.bfloat16)

            @torch.library.register_fake("lmforge::lmforge_f32_mm")
            def _(x, packed):
                return x.new_empty((x.shape[0], packed.shape[0] * packed.shape[2]))

            @torch.library.register_fake("lmforge::lmforge_decode_attention")
            def _(q, k, v, mask):
                return q.new_empty(q.shape)

            @torch.library.register_fake("lmforge::lmforge_xent_grad_")
            def _(logits, targets, ignore_index):
                return logits.new_empty((logits.shape[0],), dtype=torch.float32)

            @torch.library.register_fake("lmforge::lmforge_attn_softmax")
            def _(scores, mask, causal, scale):
                return torch.empty_like(scores)

            @torch.library.register_fake("lmforge::lmforge_attn_softmax_backward")
            def _(p, dp, scale):
                return torch.empty_like(p, memory_format=torch.contiguous_format)

            def keep(ctx, inputs, output):
                ctx.scale = inputs[3]
                ctx.save_for_backward(output)

            def backward(ctx, grad):
                return torch.ops.lmforge.lmforge_attn_softmax_backward(ctx.saved_tensors[0], grad, ctx.scale), \
                    None, None, None

            torch.library.register_autograd("lmforge::lmforge_attn_softmax", backward, setup_context=keep)

            @torch.library.register_fake("lmforge::lmforge_rms_norm")
            def _(x, weight, eps, bf16):
                return x.new_empty(x.shape, dtype=torch.bfloat16 if bf16 else torch.float32), x.new_empty(x.shape[:1])

            @torch.library.register_fake("lmforge::lmforge_rms_norm_backward")
            def _(dy, x, weight, rstd, want_dw):
                return torch.empty_like(x), x.new_empty((x.shape[1] if want_dw else 0,))

            def keep_norm(ctx, inputs, output):
                ctx.save_for_backward(inputs[0], inputs[1], output[1])

            def norm_backward(ctx, dy, _):
                x, weight, rstd = ctx.saved_tensors
                want_x, want_w = ctx.needs_input_grad[:2]
                dx, dw = torch.ops.lmforge.lmforge_rms_norm_backward(dy, x, weight, rstd, want_w)
                return dx if want_x else None, dw if want_w else None, None, None

            torch.library.register_autograd("lmforge::lmforge_rms_norm", norm_backward, setup_context=keep_norm)

            @torch.library.register_fake("lmforge::lmforge_swiglu")
            def _(gate, up):
                return torch.empty_like(gate)

            @torch.library.register_fake("lmforge::lmforge_swiglu_backward")
            def _(dy, gate, up):
                return torch.empty_like(gate), torch.empty_like(up)

            def keep_swiglu(ctx, inputs, output):
                ctx.save_for_backward(*inputs)

            def swiglu_backward(ctx, dy):
                return torch.ops.lmforge.lmforge_swiglu_backward(dy, *ctx.saved_tensors)

            torch.library.register_autograd("lmforge::lmforge_swiglu", swiglu_backward, setup_context=keep_swiglu)

            @torch.library.register_fake("lmforge::lmforge_rope")
            def _(x, cos, sin, backward):
                return x.new_empty(x.shape)

            def keep_rope(ctx, inputs, output):
                ctx.save_for_backward(inputs[1], inputs[2])

            def rope_backward(ctx, dy):
                cos, sin = ctx.saved_tensors
                dy = dy.to(torch.bfloat16)
                if dy.stride(-1) != 1:  # e.g. from a transposed matmul's backward
                    dy = dy.contiguous()
                return torch.ops.lmforge.lmforge_rope(dy, cos, sin, True), None, None, None

            torch.library.register_autograd("lmforge::lmforge_rope", rope_backward, setup_context=keep_rope)

            _loaded = path
    return _loaded


def aoti_options() -> dict:
    """Inductor options for an AOTInductor package whose graph calls the kernels: call their C functions directly
    (no dispatcher on the way) and link the library by name. The linker finds it through LIBRARY_PATH
    (`linking`); at run time it is already loaded under that name (`load`)."""
    load()
    shims = {getattr(torch.ops.lmforge, op).default: [decl] for op, decl in C_SHIMS.items()}
    return {"aot_inductor.custom_ops_to_c_shims": shims, "aot_inductor.custom_op_libs": [LIBRARY]}


@contextlib.contextmanager
def linking():
    """LIBRARY_PATH names the kernels' folder while a package that calls them is built."""
    before = os.environ.get("LIBRARY_PATH")
    os.environ["LIBRARY_PATH"] = os.pathsep.join(p for p in (str(load().parent), before) if p)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LIBRARY_PATH", None)
        else:
            os.environ["LIBRARY_PATH"] = before


def q4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """y [M, N] float32 = x [M, K] @ W^T for W packed by quantize.pack_q4 (see cpu_kernels.cpp)."""
    load()
    return torch.ops.lmforge.lmforge_q4_mm(x, qweight, scales, mins)


def q4_dequant(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """W [N, K] in bfloat16 from quantize.pack_q4's packing."""
    load()
    return torch.ops.lmforge.lmforge_q4_dequant(qweight, scales, mins)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """out [B, H, D] = softmax(q k^T / sqrt(D), masked) v for one query per row: q [B, H, D], k and v [B, KV, L, D]
    (views of the KV cache: only the last dimension need be contiguous), mask [B, L] bool, True = attend. fp32,
    D a multiple of 16."""
    load()
    return torch.ops.lmforge.lmforge_decode_attention(q, k, v, mask)


def xent_grad_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Each row's cross-entropy (float32 [N]; 0 where the target is ignore_index) of logits [N, V] (float32 or
    bfloat16, contiguous) against targets [N]; the logits are overwritten with the gradient softmax - onehot (zero
    rows where ignored), in their dtype. One fused pass per row (cpu_kernels.cpp, section 4)."""
    load()
    return torch.ops.lmforge.lmforge_xent_grad_(logits, targets, ignore_index)


def attn_softmax(scores: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float) -> torch.Tensor:
    """softmax(scale * scores) over each row's attended keys, bfloat16 in and out (0 where a row attends to
    nothing): scores [B, X, T, L] contiguous, mask [1 or B, T, L] bool (True = attend) or None, causal: the T
    queries are the last T of L positions. Differentiable (the backward is a kernel too: cpu_kernels.cpp,
    section 5)."""
    load()
    return torch.ops.lmforge.lmforge_attn_softmax(scores, mask, causal, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, bf16: bool) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension of x [N, C] (float32), weight [C] float32; the
    result in bfloat16 (bf16) or float32. Differentiable in x and weight (the backward is a kernel too:
    cpu_kernels.cpp, section 6)."""
    load()
    return torch.ops.lmforge.lmforge_rms_norm(x, weight, eps, bf16)[0]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in fp32 and rounded once: gate, up bfloat16 of one shape, contiguous.
    Differentiable (the backward is a kernel too: cpu_kernels.cpp, section 7)."""
    load()
    return torch.ops.lmforge.lmforge_swiglu(gate, up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x [B, H, T, D] bfloat16 (last dimension contiguous), cos and sin [1 or B,
    T, D] float32: computed in fp32, rounded once to bfloat16, contiguous. Differentiable in x (cpu_kernels.cpp,
    section 8)."""
    load()
    return torch.ops.lmforge.lmforge_rope(x, cos, sin, False)


F32_COLS = 16  # output columns per tile of pack_f32's layout


def pack_f32(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] float32 (N a multiple of 16) -> [N/16, K, 16], f32_mm's layout: tiles of 16 output columns."""
    n, k = weight.shape
    return weight.detach().float().reshape(n // F32_COLS, F32_COLS, k).transpose(1, 2).contiguous()


def f32_mm(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """y [M, N] float32 = x [M, K] @ W^T for `packed` = pack_f32(W)."""
    load()
    return torch.ops.lmforge.lmforge_f32_mm(x, packed)


class PackedF32Linear(torch.nn.Module):
    """An fp32 nn.Linear whose weight is packed for f32_mm (the decode packages' copy; see inference/decode.py)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", pack_f32(linear.weight))
        self.bias = linear.bias

    @staticmethod
    def fits(linear: torch.nn.Module) -> bool:
        """Whether `linear` is a plain fp32 nn.Linear whose outputs fill whole tiles."""
        return (type(linear) is torch.nn.Linear and linear.weight.dtype == torch.float32
                and linear.out_features % F32_COLS == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = f32_mm(x.reshape(-1, self.in_features), self.packed).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
