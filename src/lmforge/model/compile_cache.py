"""Where torch.compile keeps what it compiled, so that the second start of the same model is fast.

Owns: `compile_cache_dir(**key)`: the directory for one compile key, under the root
`$LMFORGE_COMPILE_CACHE` (default `$XDG_CACHE_HOME/lmforge/compile`, i.e. ~/.cache/lmforge/compile), as
`<root>/torch-<version>/<readable key>-<hash>/`; and `use_compile_cache(**key)`, which points Inductor's on-disk
caches there (TORCHINDUCTOR_CACHE_DIR: the FX graph cache, the AOTAutograd cache, autotuning results and the
compiled C++ kernels) and returns the directory. Shared by inference (the compiled decode step) and training
(compiled blocks); each passes what changes its compiled code (model shape, dtype, quantization, batch sizes...).

Why a directory per key when Inductor's caches are content-addressed anyway: so that a user can see what is
cached for which model (each directory has a `key.json`) and delete one model's entries, and so that the torch
version, which invalidates everything, is the first path component. Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path


def cache_root() -> Path:
    """$LMFORGE_COMPILE_CACHE, else $XDG_CACHE_HOME/lmforge/compile (~/.cache/lmforge/compile)."""
    env = os.environ.get("LMFORGE_COMPILE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmforge" / "compile"


def compile_cache_dir(torch_version: str, **key: object) -> Path:
    """The (created) directory for this torch version and key; key values must be JSON-serialisable."""
    full = {"torch": torch_version, "machine": platform.machine(), **key}
    blob = json.dumps(full, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    readable = "-".join(str(key[k]) for k in ("kind", "dtype", "quantize") if key.get(k) is not None)
    d = cache_root() / f"torch-{torch_version}" / (f"{readable}-{digest}" if readable else digest)
    d.mkdir(parents=True, exist_ok=True)
    meta = d / "key.json"
    if not meta.exists():
        meta.write_text(json.dumps(full, indent=2, sort_keys=True, default=str) + "\n")
    return d


def use_compile_cache(**key: object) -> Path:
    """Point Inductor's caches at this key's directory (for this process, from now on); returns it."""
    import torch

    d = compile_cache_dir(torch.__version__, **key)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(d)
    return d
