"""How many CPU threads the engine runs the model with: chosen by measuring, step by step, unless the user fixes it.

Owns: `ThreadChooser` (per phase, decode or prefill: time the steps at each candidate thread count, run the
fastest, re-check the others now and then) and `cpu_cores()`.

Why measure instead of a fixed default (figures in docs/serve.md): on an idle 2-core machine two threads decode
and prefill faster than one; on the same machine busy with other work, two threads are several times slower
than one (an OpenMP team waits at every barrier for a thread the scheduler has descheduled: 5 against 36 tokens/s
measured here), and a server's own HTTP thread competes for the cores too. No fixed number is right for both, so
by default the engine keeps an estimate of the seconds per step (decode, per batch size) or per token (prefill)
for every candidate, runs the best, and probes each other one with a step every so often: half a second at
first, doubling while the choice holds (up to 8 s), back to half a second when it changes, and never more often
than keeps the probes under 5% of the time (on a busy machine a two-thread decode step took 1.1 s against 15 ms
for one thread: such a probe waits a minute). What the probes buy is never being stuck on the wrong count long.

The compiled decode step follows the choice at run time: it is built with Inductor's `cpp.dynamic_threads`, so
its kernels take the calling thread's OpenMP team size instead of a number fixed at compile time.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from collections.abc import Sequence

import torch

FIRST_PERIOD, MAX_PERIOD = 0.5, 8.0  # seconds between probes of the other thread counts
PROBE_SHARE = 0.05  # at most this share of the time goes to probing
SAMPLES = 3  # a candidate's estimate: the median of its last few measurements (one outlier does not decide)


def cpu_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(n: int) -> None:
    """torch's intra-op threads for the calling thread (OpenMP's team size is per thread)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


class ThreadChooser:
    """Pick per step among `candidates` thread counts by measured cost; `fixed` = one candidate, no probing."""

    def __init__(self, candidates: Sequence[int]):
        self.candidates = sorted(set(int(c) for c in candidates if c >= 1)) or [1]
        self.samples: dict[tuple, deque] = {}  # (key, threads) -> the last seconds per unit
        self.best: dict = {}  # key -> threads in use
        self._next_probe: dict = {}  # key -> (time of the next probe, period)
        self._probing: dict = {}  # key -> [threads left to probe, steps left on the current one]

    @property
    def fixed(self) -> bool:
        return len(self.candidates) == 1

    def pick(self, key) -> int:
        """Thread count for the next step of kind `key` (e.g. the decode batch size)."""
        if self.fixed:
            return self.candidates[0]
        unknown = [c for c in self.candidates if (key, c) not in self.samples]
        if unknown:  # measure every candidate once before choosing
            return unknown[0]
        if key not in self.best:
            self._choose(key)
        probe = self._probing.get(key)
        if probe:
            return probe[0]
        due, _ = self._next_probe[key]
        if time.monotonic() >= due:
            self._probing[key] = [c for c in self.candidates if c != self.best[key]]
            return self._probing[key][0]
        return self.best[key]

    def record(self, key, threads: int, seconds: float, units: int = 1) -> None:
        """The step of kind `key` at `threads` took `seconds` for `units` (tokens, or 1 per decode step)."""
        if self.fixed or units <= 0:
            return
        self.samples.setdefault((key, threads), deque(maxlen=SAMPLES)).append(seconds / units)
        probe = self._probing.get(key)
        if probe and probe[0] == threads:
            probe.pop(0)
            if not probe:
                del self._probing[key]
                self._choose(key)

    def estimate(self, key, threads: int) -> float:
        """Seconds per unit at `threads` for steps of kind `key`: the median of the last measurements."""
        return statistics.median(self.samples[(key, threads)])

    def reset(self) -> None:
        """Forget what was measured (after a warm-up whose steps paid one-off costs)."""
        self.samples.clear()
        self.best.clear()
        self._next_probe.clear()
        self._probing.clear()

    def _choose(self, key) -> None:
        before = self.best.get(key)
        self.best[key] = min(self.candidates, key=lambda c: self.estimate(key, c))
        _, period = self._next_probe.get(key, (0.0, FIRST_PERIOD / 2))
        period = FIRST_PERIOD if before is not None and before != self.best[key] else min(2 * period, MAX_PERIOD)
        probe_cost = sum(self.estimate(key, c) for c in self.candidates if c != self.best[key])
        wait = max(period, probe_cost / PROBE_SHARE)
        self._next_probe[key] = (time.monotonic() + wait, period)
