"""Where torch.compile keeps what it compiled, so that the second start of the same model is fast.

Owns: `compile_cache_dir(**key)`: the directory for one compile key, under the root
`$LMFORGE_COMPILE_CACHE` (default `$XDG_CACHE_HOME/lmforge/compile`, i.e. ~/.cache/lmforge/compile), as
`<root>/torch-<version>/<readable key>-<hash>/`; and `use_compile_cache(**key)`, which turns Inductor's on-disk
caches on and points them there (TORCHINDUCTOR_CACHE_DIR: the FX graph cache, the AOTAutograd cache, autotuning
results and the compiled C++ kernels) and returns the directory. Called with no key, it uses one directory per
torch version. A TORCHINDUCTOR_CACHE_DIR the user exported is respected (used as it is, never replaced). Shared by inference (the compiled decode step) and training
(compiled blocks); each passes what changes its compiled code (model shape, dtype, quantization, batch sizes...).

Why a directory per key when Inductor's caches are content-addressed anyway: so that a user can see what is
cached for which model (each directory has a `key.json`) and delete one model's entries, and so that the torch
version, which invalidates everything, is the first path component. Stdlib only, but for torch inside
use_compile_cache.
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


_SET_BY_US: set[str] = set()  # TORCHINDUCTOR_CACHE_DIR values this module chose (any other one is the user's)


def user_cache_dir() -> str | None:
    """TORCHINDUCTOR_CACHE_DIR when the user set it (not this module, not Inductor's own default); else None."""
    d = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not d or d in _SET_BY_US:
        return None
    try:  # Inductor writes its default (a temp directory) back into the environment once it has used it
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if os.path.abspath(d) == os.path.abspath(default_cache_dir()):
            return None
    except ImportError:
        pass
    return d


def use_compile_cache(**key: object) -> Path:
    """Turn Inductor's on-disk caches on (FX graph cache, AOTAutograd cache) and point them at this key's directory
    (for this process, from now on); returns the directory used. With no key: one directory for this torch version.
    A TORCHINDUCTOR_CACHE_DIR the user set themselves wins: it is kept, and returned."""
    import torch
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    user = user_cache_dir()
    if user is not None:
        d = Path(user)
        d.mkdir(parents=True, exist_ok=True)
        return d
    d = compile_cache_dir(torch.__version__, **key)
    _SET_BY_US.add(str(d))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(d)
    return d
