"""A GGUF file as an HF model directory: the import itself, and the cache that lets a .gguf file (or a packaged
model name) stand wherever a model directory does.

Why a .gguf given as --model is imported into a cache directory rather than loaded in memory: every verb and
helper that takes a model path keeps working unchanged (tokenizer, generation_config stop ids, lineage, eval and
RAG read the directory), the dequantization (seconds for a small model, minutes for a large K-quant) is paid once,
and later starts are a safetensors read. The cache lives in $LMFORGE_CACHE (default ~/.cache/lmforge)/gguf, one
directory per file and dtype, keyed by the file's size, mtime and a hash of its first and last MiB (reading a
many-GB file whole on every start would cost more than the import saves). The GGUF format is lmforge/gguf.py's,
the directory's checkpoint.py's.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from lmforge import checkpoint, gguf
from lmforge.errors import LmforgeError

DTYPES = ("float32", "bfloat16", "float16")


def import_gguf(src: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write the GGUF file `src` as an HF model directory at `out` (dequantized to `dtype`). Returns out."""
    if dtype not in DTYPES:
        raise LmforgeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    g = gguf.read_gguf(src)
    model = g.to_model(getattr(torch, dtype))
    lineage = {"stage": "import", "source": str(Path(src).resolve()), "gguf_name": g.name,
               "gguf_architecture": g.architecture, "gguf_file_type": g.file_type,
               "gguf_tensor_types": dict(g.tensor_types), "dtype": dtype}
    generation = {"eos_token_id": g.stop_ids if len(g.stop_ids) != 1 else g.stop_ids[0]} if g.stop_ids else None
    return checkpoint.save_model(model, out, tokenizer=g.tokenizer, lineage=lineage, generation=generation)


def _file_key(p: Path) -> str:
    st = p.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(p, "rb") as fh:
        h.update(fh.read(1 << 20))
        if st.st_size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge") / "gguf"


def cached_import(src: str | Path, dtype: str = "float32") -> Path:
    """The cache directory holding `src` imported at `dtype`, importing it first if it is not there yet."""
    p = Path(src).resolve()
    out = cache_root() / f"{p.stem}-{_file_key(p)}-{dtype}"
    if checkpoint.is_complete(out):
        return out
    print(f"importing {p.name} into {out} (once; later runs reuse it)", file=sys.stderr)
    return import_gguf(p, out, dtype)
