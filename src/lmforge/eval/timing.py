"""How `lmforge compare` times its variants, so that identical models get identical figures.

One timing per variant, taken while the machine's load changes, made three copies of one model differ 18x in
latency. So every local variant is timed the same way, on the same items:
  - a fixed thread count: torch's intra-op threads are set to `threads` before every timed chunk and read back
    after it (recorded per pass), so no variant runs with more cores than another, whatever changed the setting;
  - warm-up: one untimed pass of every variant before any timed pass (first-call allocations, lazy loads, the
    RAG embedder's first batch stay out of the figures);
  - interleaved passes: a round times every variant once over the same items, the variants taking turns item by
    item (at concurrency 1) in an order rotated at every turn (A B, B A, ...), so a change of load hits all
    variants alike instead of whichever ran at that moment;
  - the median over the passes, with the range (min - max) as the spread; Python's garbage collector is paused
    inside a timed chunk (as timeit does) so a collection does not land in one variant's figure;
  - two clocks per chunk. Wall time gives what a user waits and sees: latency (mean request latency of the pass,
    at concurrency 1 one user's wait) and tokens/s (the timed items' prompt + generated tokens / wall seconds).
    CPU time of this process, divided by the thread count, gives the machine time the queries occupied:
    "machine seconds per query" and the throughput a query is priced at. On a machine of its own the two agree;
    on a shared one wall time also counts the moments other jobs held the cores (here: 2 cores at load 4-5 moved
    a pass's wall-time tokens/s 4x within a second), which is not work the query did nor time you would pay for;
  - the load average (1, 5, 15 minutes) before and after, recorded with the results.

What the protocol delivers, measured with two copies of one model directory timed as two variants through
`lmforge compare` (7 passes of 40 items, 1 thread; tests/eval/test_compare.py's configuration) on this
project's shared 2-core machine at load 3-7, other test suites running:
  - machine time, tokens per machine-second and so cost: the medians differed by 1.3% typically, 4.5% at the
    90th percentile, 6.1% at worst (40 runs): CPU_TOLERANCE = 15%;
  - wall-time tokens/s and latency: 4-5% typically, 11-15% at the 90th percentile, 31% at worst (73 runs):
    WALL_TOLERANCE = 50%. A quieter machine does far better (wall time within 3% in 10 of 10 trials at load 2.5).
A variant run at another thread count misses both by far (two threads against a busy partner core ran 50x slower
here). Whether the protocol was followed is in the record, which the test checks: the threads read back after
every chunk, the warm-up passes, the items of every pass.
API variants are not timed here: each pass would be billed, and the remote's speed is not this machine's.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from lmforge.errors import LmforgeError

# relative difference of two identical variants' medians that this protocol stays within; see the docstring
CPU_TOLERANCE = 0.15  # machine time per query, tokens per machine-second, cost
WALL_TOLERANCE = 0.50  # wall-time latency and tokens/s on a busy shared machine


@dataclass
class Pass:
    """One timed pass of one variant over the timing items."""

    round: int
    seconds: float  # wall time
    cpu_s: float  # this process's CPU time
    tokens: int
    queries: int
    latency_s: float  # mean request latency in the pass
    threads: int  # torch's intra-op threads as read back after each chunk (-1 if they differed)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def machine_s(self) -> float:
        """Machine time the pass occupied: CPU seconds spread over the threads it was allowed."""
        return self.cpu_s / max(1, self.threads)

    @property
    def machine_tokens_per_s(self) -> float:
        return self.tokens / self.machine_s if self.machine_s > 0 else 0.0


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the OS reports them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def rotation(names: list[str], k: int) -> list[str]:
    """`names` started k places further along: the order of the k-th interleaved slot."""
    return [names[(k + i) % len(names)] for i in range(len(names))]


def _median_range(xs: list[float]) -> tuple[float, list[float]]:
    return statistics.median(xs), [min(xs), max(xs)]


def summarize_passes(passes: list[Pass]) -> dict:
    """Medians and ranges over a variant's passes: wall-time tokens/s and latency, machine (CPU) time per query
    and tokens per machine-second; spread = range / median of wall-time tokens/s."""
    tps, tps_range = _median_range([p.tokens_per_s for p in passes])
    lat, lat_range = _median_range([p.latency_s for p in passes])
    mtps, mtps_range = _median_range([p.machine_tokens_per_s for p in passes])
    mq, mq_range = _median_range([p.machine_s / max(1, p.queries) for p in passes])
    return {"tokens_per_s": tps, "tokens_per_s_range": tps_range, "latency_s": lat, "latency_s_range": lat_range,
            "machine_tokens_per_s": mtps, "machine_tokens_per_s_range": mtps_range,
            "machine_s_per_query": mq, "machine_s_per_query_range": mq_range,
            "spread": (tps_range[1] - tps_range[0]) / tps if tps > 0 else None,
            "machine_spread": (mtps_range[1] - mtps_range[0]) / mtps if mtps > 0 else None,
            "threads": sorted({p.threads for p in passes}),
            "passes": [asdict(p) | {"tokens_per_s": p.tokens_per_s, "machine_tokens_per_s": p.machine_tokens_per_s}
                       for p in passes]}


def measure(runs: dict[str, Callable[[list[int]], list[dict]]], items: list[int], passes: int, threads: int,
            chunk: int = 1, warmup: int = 1) -> dict:
    """Time each variant by the protocol above. `runs[name](indices)` scores or generates those items and returns
    their records (prompt_tokens, output_tokens, latency_s each).

    A round is one pass of every variant over `items`, interleaved `chunk` items at a time: for each chunk the
    variants take turns, in an order rotated by round and chunk. chunk=1 (one query at a time, as at concurrency
    1) interleaves finest, so two variants see the same load to within a query; at higher concurrency a chunk is
    the whole pass, so the requests in flight belong to one variant. A pass's seconds are the wall time of its
    own chunks. Returns {"threads", "passes", "warmup", "items", "chunk", "loadavg_before", "loadavg_after",
    "tolerance", "wall_tolerance", "variants": {name: summarize_passes(...)}}.
    """
    import torch

    if passes < 1:
        raise LmforgeError(f"--timing-passes must be at least 1, got {passes}")
    if threads < 1:
        raise LmforgeError(f"the thread count must be at least 1, got {threads}")
    if not items:
        raise LmforgeError("timing needs at least one item")
    names = list(runs)
    chunks = [items[k:k + max(1, chunk)] for k in range(0, len(items), max(1, chunk))]
    before = loadavg()
    for _ in range(warmup):
        for name in names:
            torch.set_num_threads(threads)
            runs[name](list(items))
    timed: dict[str, list[Pass]] = {n: [] for n in names}
    for r in range(passes):
        seconds, cpu = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        tokens, queries, latency = dict.fromkeys(names, 0), dict.fromkeys(names, 0), dict.fromkeys(names, 0.0)
        threads_seen: dict[str, set[int]] = {n: set() for n in names}
        for c, ch in enumerate(chunks):
            for name in rotation(names, r + c):
                torch.set_num_threads(threads)
                gc.disable()
                try:
                    t0, c0 = time.perf_counter(), time.process_time()
                    records = runs[name](ch)
                    seconds[name] += time.perf_counter() - t0
                    cpu[name] += time.process_time() - c0
                finally:
                    gc.enable()
                threads_seen[name].add(torch.get_num_threads())
                tokens[name] += sum(int(x["prompt_tokens"]) + int(x["output_tokens"]) for x in records)
                latency[name] += sum(float(x["latency_s"]) for x in records)
                queries[name] += len(records)
        gc.collect()  # between rounds, outside every timed chunk
        for name in names:
            seen = threads_seen[name]
            timed[name].append(Pass(r, seconds[name], cpu[name], tokens[name], queries[name],
                                    latency[name] / max(1, queries[name]), max(seen) if len(seen) == 1 else -1))
    return {"threads": threads, "passes": passes, "warmup": warmup, "items": len(items), "chunk": chunk,
            "loadavg_before": before, "loadavg_after": loadavg(), "tolerance": CPU_TOLERANCE,
            "wall_tolerance": WALL_TOLERANCE, "variants": {n: summarize_passes(p) for n, p in timed.items()}}


def agreement(a: dict, b: dict, key: str = "tokens_per_s") -> float:
    """Relative difference of two variants' medians of `key`: |a - b| / mean(a, b)."""
    x, y = a[key], b[key]
    return abs(x - y) / ((x + y) / 2) if x + y > 0 else 0.0
