"""What memory this machine has free, so that an allocation which cannot fit is refused before it is tried.

Owns: `available_bytes(device)`: for a CUDA device its free memory (plus what torch's caching allocator holds
unused); for the host the smallest of /proc/meminfo's MemAvailable (os.sysconf where there is no /proc), the
headroom under a cgroup memory limit (containers) and the headroom under the process's address-space limit
(`ulimit -v`). `format_bytes` for messages, `parse_bytes` for sizes users type (--kv-cache-memory 2GB, or 30%
of what is free). Leaves to accounting.py what a model needs, and to the callers (checkpoint loading, the KV
cache) what to suggest instead.

Why ask first rather than catch the allocator's error: on the host an oversized allocation is rarely refused;
torch zero-fills it page by page until the machine swaps or the OOM killer ends the process. On CUDA the
allocator raises, but its message names neither the cause nor the fix.

Stdlib only at import; torch is imported only to ask a CUDA device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    import resource
except ImportError:  # Windows: no address-space limits to read
    resource = None  # type: ignore[assignment]


def available_bytes(device: Any = None) -> int | None:
    """Bytes that can still be allocated on `device` (None/"cpu" = host RAM); None when it cannot be known."""
    kind = str(device) if device is not None else "cpu"
    if kind == "meta":
        return None  # meta tensors hold no memory
    if kind.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        dev = torch.device(kind)
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    limits = [v for v in (_mem_available(), _cgroup_headroom(), _address_space_headroom()) if v is not None]
    return min(limits) if limits else None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_headroom() -> int | None:
    """limit - usage of this process's cgroup (v2, then v1); None without a limit."""
    pairs = [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
             ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")]
    for limit_file, usage_file in pairs:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 writes a huge number for "no limit"
            return None
        return max(int(limit) - usage, 0)
    return None


def _address_space_headroom() -> int | None:
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        used = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
    return max(soft - used, 0)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, device: Any = None) -> int:
    """'2GB', '512MiB', '1.5g', '3000000' (bytes) or '30%' (of what is free on `device` now) -> bytes.

    Raises ValueError with what was wrong (callers turn it into their own error)."""
    s = str(text).strip().lower().replace(" ", "")
    if s.endswith("%"):
        free = available_bytes(device)
        if free is None:
            raise ValueError(f"{text!r}: a share of free memory, but how much is free here cannot be known")
        pct = float(s[:-1])
        if not 0 < pct <= 100:
            raise ValueError(f"{text!r}: a percentage must be in (0, 100]")
        return int(free * pct / 100)
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in _UNITS or not num:
        raise ValueError(f"{text!r} is not a size: write e.g. 2GB, 512MiB, 3000000 (bytes) or 30% (of free memory)")
    return int(float(num) * _UNITS[unit])
