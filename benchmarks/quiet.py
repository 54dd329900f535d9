"""Waiting for a quiet machine before a timed run, and saying how quiet it was (Linux; elsewhere a no-op).

A benchmark on a shared machine is only as good as the minute it ran in. `wait_quiet` samples the whole machine's
CPU use (/proc/stat) between runs and waits, up to a limit, until other processes use less than `busy` of it;
it returns what it measured so the benchmark can print it beside its figures (the 1-minute load average too).
"""

from __future__ import annotations

import os
import sys
import time


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts), idle


def busy_fraction(seconds: float = 1.0) -> float | None:
    """Share of all CPUs busy over the next `seconds` (None where /proc/stat is missing)."""
    a = _cpu_times()
    time.sleep(seconds)
    b = _cpu_times()
    if a is None or b is None or b[0] == a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


def wait_quiet(busy: float = 0.15, max_wait: float = 600.0) -> dict:
    """Wait until the machine's CPUs are less than `busy` busy (or `max_wait` seconds passed); returns
    {"busy": last measured share, "waited_s": seconds waited, "load1": 1-minute load average}."""
    t0 = time.perf_counter()
    frac = busy_fraction()
    while frac is not None and frac > busy and time.perf_counter() - t0 < max_wait:
        print(f"  (machine {frac:.0%} busy: waiting for a quiet moment)", file=sys.stderr, flush=True)
        time.sleep(5)
        frac = busy_fraction()
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"busy": frac, "waited_s": round(time.perf_counter() - t0, 1), "load1": load1}


class Watch:
    """Around one child process's run: the share of the machine's CPUs that *other* processes used meanwhile
    (all CPU time on /proc/stat minus what our children used, over wall time x CPUs)."""

    def __enter__(self) -> Watch:
        import resource

        self._t, self._cpu = time.perf_counter(), _cpu_times()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._kids = ru.ru_utime + ru.ru_stime
        return self

    def __exit__(self, *exc) -> None:
        import resource

        wall = time.perf_counter() - self._t
        end = _cpu_times()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        kids = ru.ru_utime + ru.ru_stime - self._kids
        self.others = None
        if self._cpu is not None and end is not None and wall > 0:
            ticks = os.sysconf("SC_CLK_TCK")
            busy = ((end[0] - self._cpu[0]) - (end[1] - self._cpu[1])) / ticks
            self.others = max(0.0, (busy - kids) / (wall * (os.cpu_count() or 1)))
