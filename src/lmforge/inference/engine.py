"""The Engine: token ids in, token ids out, for many requests at once (continuous batching over a KV cache).

Owns: the model in eval mode, one KVCache with `max_batch` slots, a waiting queue, and the scheduler loop.
Leaves to others: text, chat templates and stop strings (generate.py), HTTP (serve/), loading (load.py).

One scheduler iteration (`step`), after vLLM / TGI's continuous batching and gpt-fast's decode loop:
  1. finalise cancelled requests and free their slots; admit waiting requests into free slots (see prefix
     reuse below);
  2. prefill: up to `prefill_chunk` prompt tokens of admitted requests (chunked prefill, so a long prompt
     never stalls the streams already running for more than one chunk); a finished prompt samples its first token;
  3. decode: one batched forward over every decoding request, one token each; finished sequences free their
     slot at once, so a waiting request takes it on the next iteration.

Speed decisions (CPU first; measured in benchmarks/bench_decode.py, figures in docs/serve.md):
  - the decode batch is rows 0..n-1 of the cache, read as a view (no gather); a free or still-prefilling row in
    that range is a padding row that writes nothing (`write_mask`), so a free slot keeps what it holds;
  - compile=True: decode steps run the compiled whole-model program of inference/decode.py (an AOTInductor
    package per batch-size bucket, weights frozen in, C++ GEMM templates; prefill stays eager). `warmup()`
    compiles, or loads from the on-disk compile cache. LMFORGE_COMPILE=0 in the environment turns it off whatever the caller asked
    (the verbs' --compile defaults included);
  - threads (llama.cpp's -t / -tb for decode / prefill): a number, or "auto": the faster of one thread and all
    cores, measured step by step (inference/threads.py): on a busy 2-core machine two OpenMP threads were several
    times slower than one, on an idle one faster;
  - one host sync per step: `.tolist()` of the sampled ids; positions and lengths are kept host-side;
  - torch.inference_mode for the whole loop.

KV cache sized by memory: `kv_memory` bytes (default: what max_batch sequences of the context need, but no more
than KV_FREE_FRACTION of the memory free at start) decide the positions per slot, `max_len`. A context asked
for explicitly that the budget cannot buy is an error that says what fits; by default the context is cut to
what fits, and `cache_summary()` says so. The cache starts at INITIAL_CAPACITY positions per slot and doubles as
sequences grow (KVCache.reserve), so memory follows use.

Prefix reuse: a free slot keeps the keys and values of its last occupant (the tokens it fed: prompt and output).
A new request takes the free slot holding the longest prefix of its prompt (on a tie, the one holding the least
beyond it) and prefills from there: the system prompt and the earlier turns of a chat, or a shared RAG context,
are not computed again. The last prompt token always runs (it gives the first token's logits). Requests asking
for prompt_logprobs or logprobs prefill everything (their numbers stay bitwise those of a request alone).

Constrained rows (SamplingParams.grammar, constrain.py): each gets its grammar's mask before sampling (one
llguidance call fills every constrained row) and is advanced with its token after; it ends when the grammar
is complete. A step with no constrained row pays one any() over the rows.

Prompt log-probabilities (`SamplingParams.prompt_logprobs`, vLLM's name; what scoring tools such as
lm-evaluation-harness ask for) are computed only for the requests that ask: their prefill chunks return the
logits of every position of the chunk ([T, V] for at most `prefill_chunk` tokens, never the whole prompt's),
and each prompt token's logprob under the tokens before it lands in `Generation.prompt_logprobs` before the
request's first event. `max_tokens=0` prefills (and scores) the prompt and generates nothing.

One request's failure is its own: each request's prefill runs on its own, and a decode step that raises is
retried row by row, so only the rows that fail alone end with an "error" event; the rest go on.

Greedy output is the same whether a request runs alone or in a busy batch: every row's math is independent of
the others (per-row positions and masks, per-row sampling). Logits agree to float rounding (~1e-6), so a
token can differ only at an exact near-tie of the two best logits.

Threading: `submit()` and `cancel()` are thread-safe; `start()` runs the loop in a daemon thread, or a caller
drives `step()` itself (tests, the `generate` verb). A `Generation` handle yields `TokenEvent`s, to a plain
`for` loop or an `async for` (the server's event loop is woken with call_soon_threadsafe).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError
from lmforge.inference.constrain import Constraint, allowed_tokens
from lmforge.inference.sampling import PenaltyState, SamplingParams, logprobs_of, sample
from lmforge.inference.threads import ThreadChooser, cpu_cores, set_threads
from lmforge.model import accounting, memory

log = logging.getLogger("lmforge.engine")


INITIAL_CAPACITY = 256  # positions per slot allocated at start; the cache doubles from there as sequences grow
# Without --kv-cache-memory the cache may grow to the model's whole context for every slot, but to no more than
# this share of the memory free at start (the weights are loaded by then); what that buys is said at start.
KV_FREE_FRACTION = 0.25


def engine_kwargs(threads: int = 0, prefill_threads: int = 0, kv_cache_memory: str | None = None,
                  model=None) -> dict:
    """Engine keyword arguments from the verbs' flags (--threads, --prefill-threads, --kv-cache-memory): 0 threads
    means "auto" (measured step by step, inference/threads.py); a size as memory.parse_bytes reads it."""
    kw: dict = {"threads": threads or "auto", "prefill_threads": prefill_threads or "auto"}
    if kv_cache_memory:
        device = next(model.parameters()).device if model is not None else None
        try:
            kw["kv_memory"] = memory.parse_bytes(kv_cache_memory, device)
        except ValueError as e:
            raise LmforgeError(f"--kv-cache-memory {e}") from None
    return kw


def _chooser(threads: int | str | None) -> ThreadChooser:
    if threads == "auto":
        return ThreadChooser([1, cpu_cores()])
    if threads is None:
        return ThreadChooser([torch.get_num_threads()])
    if not isinstance(threads, int) or threads < 1:
        raise LmforgeError(f"threads must be a positive number or 'auto', got {threads!r}")
    return ThreadChooser([threads])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ContextLengthExceeded(LmforgeError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""

    def __init__(self, message: str, prompt_tokens: int, max_len: int):
        super().__init__(message)
        self.prompt_tokens, self.max_len = prompt_tokens, max_len


class QueueFull(LmforgeError):
    """Too many requests are waiting; the client should retry later."""


@dataclass
class TokenEvent:
    """One generated token, or the end of a generation (finish_reason set; token may be None then)."""

    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (an EOS / stop id), "length", "cancelled", "error"
    error: str | None = None


_WAITING, _PREFILL, _DECODE, _DONE = range(4)


class Generation:
    """Handle of one submitted request: iterate it (sync or async) for TokenEvents; cancel() to stop it.

    prompt_logprobs (when the params ask for them): one TokenEvent per prompt token, its logprob under the
    tokens before it (None for the first token) and the top alternatives; complete before the first event."""

    def __init__(self, engine: Engine, rid: int, prompt_ids: list[int], params: SamplingParams,
                 stop_ids: frozenset[int], rng: random.Random):
        self.engine, self.id, self.prompt_ids, self.params = engine, rid, prompt_ids, params
        self.output_ids: list[int] = []
        self.prompt_logprobs: list[TokenEvent] | None = [] if params.prompt_logprobs is not None else None
        self.finish_reason: str | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_done: float | None = None
        # scheduler state (engine thread only)
        self._stop_ids = stop_ids
        self._rng = rng
        self._state = _WAITING
        self._slot = -1
        self._pos = 0  # tokens of this sequence in the cache (the next write position)
        self._last = -1  # the token to feed at the next decode step
        self._cancel = False
        self._penalty: PenaltyState | None = None
        self._constraint: Constraint | None = None  # the grammar's state, when params.grammar is set
        self._events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self._notify = None  # (asyncio loop, asyncio.Event) of an async consumer

    # ---- consumer side -------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end this generation (EOS unless ignore_eos, plus its stop_token_ids); read-only."""
        return self._stop_ids

    def cancel(self) -> None:
        self.engine.cancel(self)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            ev = self._events.get()
            yield ev
            if ev.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        import asyncio

        flag = asyncio.Event()
        self._notify = (asyncio.get_running_loop(), flag)  # set before draining: no push is missed
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                await flag.wait()
                flag.clear()
                continue
            yield ev
            if ev.finish_reason is not None:
                return

    def result(self) -> list[int]:
        """Block until finished; the generated ids (a stop id included if one ended it). Safe to call again."""
        if not self.done:
            for _ in self:
                pass
        return self.output_ids

    # ---- engine side ---------------------------------------------------------------------------------
    def _push(self, ev: TokenEvent) -> None:
        self._events.put(ev)
        notify = self._notify
        if notify is not None:
            loop, flag = notify
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # the consumer's loop has closed: nobody is listening
                pass


TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds, for /metrics


@dataclass
class EngineStats:
    """Counters for /metrics. Written by the engine thread only; readers see a consistent-enough snapshot."""

    requests_total: int = 0
    requests_finished: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    ttft_hist: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))  # per bucket, not cumulative
    decode_steps: int = 0
    decode_seconds: float = 0.0
    decode_tokens: int = 0
    prefill_seconds: float = 0.0
    prompt_tokens_reused: int = 0  # prompt tokens whose prefill a slot's kept prefix saved
    queue_length: int = 0
    running: int = 0
    last_tokens_per_s: float = 0.0


class Engine:
    """Batched generation over one model with a slot KV cache. Token ids in, token ids out."""

    def __init__(self, model, *, max_batch: int = 8, max_len: int | None = None, eos_ids: Sequence[int] = (),
                 prefill_chunk: int = 512, max_queue: int = 256, seed: int = 0, compile: bool = False,
                 kv_memory: int | None = None, prefix_reuse: bool = True, threads: int | str | None = None,
                 prefill_threads: int | str | None = None):
        if max_batch < 1:
            raise LmforgeError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_chunk < 1:
            raise LmforgeError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.model = model.eval()
        self.cfg = model.cfg
        requested = int(max_len or self.cfg.max_seq_len)
        if not 2 <= requested <= self.cfg.max_seq_len:
            raise LmforgeError(f"max_len must be between 2 and the model's context ({self.cfg.max_seq_len}), "
                               f"got {requested}")
        self.max_batch, self.prefill_chunk, self.max_queue = max_batch, prefill_chunk, max_queue
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.vocab_size = self.cfg.vocab_size
        self.device = next(model.parameters()).device
        self.kv_budget, self.kv_budget_source, self.max_len = self._size_cache(requested, max_len is not None,
                                                                               kv_memory)
        self.cache = model.new_cache(max_batch, self.max_len, capacity=min(self.max_len, INITIAL_CAPACITY))
        self.prefix_reuse = prefix_reuse
        # token ids whose keys/values a free slot still holds at positions 0..len-1 (prefix reuse)
        self._slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]
        self.stats = EngineStats()
        self._slots: list[Generation | None] = [None] * max_batch
        self._waiting: deque[Generation] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._seed_rng = random.Random(seed)  # streams of requests that bring no seed
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._forward = model.forward
        # CPU threads for decode and for prefill (llama.cpp's -t / -tb): a number, "auto" (the faster of 1 and all
        # cores, measured as the engine runs: inference/threads.py), or None (torch's setting as it is)
        self.threads, self.prefill_threads = threads, prefill_threads
        self._decode_threads = _chooser(threads)
        self._prefill_threads = _chooser(prefill_threads if prefill_threads is not None else threads)
        self.compiled = None
        self._warming: threading.Thread | None = None  # compiling the larger batch sizes (warmup(background=True))
        if compile and os.environ.get("LMFORGE_COMPILE", "1") == "0":
            # a machine-wide "never compile" (the test suite sets it: a cold compile costs seconds to minutes)
            log.info("LMFORGE_COMPILE=0: decoding eagerly")
            compile = False
        if compile:
            from lmforge.inference.decode import CompiledDecode, batch_buckets, can_compile

            why_not = can_compile(self.device)
            if why_not:
                log.warning("%s: decoding eagerly", why_not)
            else:
                self.compiled = CompiledDecode.for_model(model, max(self._decode_threads.candidates),
                                                         dynamic_threads=not self._decode_threads.fixed)
                self._buckets = batch_buckets(max_batch)

    def _size_cache(self, requested: int, explicit: bool, kv_memory: int | None) -> tuple[int, str, int]:
        """(budget bytes, where the budget came from, positions per slot it buys). See KV_FREE_FRACTION."""
        per_position = accounting.kv_bytes_per_token(self.cfg, self.model.model.embed_tokens.weight.element_size())
        per_position = int(per_position * self.max_batch)  # one position in every slot
        free = memory.available_bytes(self.device)
        if kv_memory is not None:
            if kv_memory < 2 * per_position:
                raise LmforgeError(f"--kv-cache-memory {memory.format_bytes(kv_memory)} holds less than 2 positions "
                                   f"for {self.max_batch} sequence(s) ({memory.format_bytes(per_position)} per "
                                   f"position); give more, or lower --max-batch")
            if free is not None and kv_memory > free:
                raise LmforgeError(f"--kv-cache-memory {memory.format_bytes(kv_memory)} is more than the "
                                   f"{memory.format_bytes(free)} free on {self.device}; give less")
            budget, source = kv_memory, "--kv-cache-memory"
        else:
            budget = requested * per_position
            source = "the full context"
            if free is not None and budget > KV_FREE_FRACTION * free:
                budget = int(KV_FREE_FRACTION * free)
                source = f"{KV_FREE_FRACTION:.0%} of free memory, {memory.format_bytes(free)}"
        fits = min(requested, budget // per_position)
        if fits < requested and explicit:
            hint = f"about {fits} positions fit" if fits >= 2 else "no context fits"
            raise LmforgeError(
                f"the KV cache for {self.max_batch} sequence(s) of {requested} positions needs "
                f"{memory.format_bytes(requested * per_position)} ({requested * per_position} bytes), but its "
                f"budget is {memory.format_bytes(budget)} ({source}); the model's context (max_position_embeddings) "
                f"is {self.cfg.max_seq_len}. Lower the context with --max-len N ({hint}), serve fewer sequences "
                f"at once with --max-batch, or raise --kv-cache-memory")
        if fits < 2:
            raise LmforgeError(f"the KV cache budget {memory.format_bytes(budget)} ({source}) holds less than 2 "
                               f"positions for {self.max_batch} sequence(s); lower --max-batch or free memory")
        return budget, source, fits

    def cache_summary(self) -> str:
        """What the KV cache holds now, what it may grow to, and how many tokens of context that buys."""
        c = self.cache
        dtype = str(c.dtype).removeprefix("torch.")
        clipped = (f" (the model's context is {self.cfg.max_seq_len}: raise --kv-cache-memory for more)"
                   if self.max_len < self.cfg.max_seq_len and self.kv_budget_source != "the full context" else "")
        return (f"KV cache: {c.slots} sequence(s) x {c.capacity} positions allocated ({memory.format_bytes(c.nbytes())}"
                f", {dtype}); grows on demand to {c.slots} x {self.max_len} positions = "
                f"{c.slots * self.max_len:,} tokens of context in {memory.format_bytes(c.bytes_for(self.max_len))} "
                f"(budget: {self.kv_budget_source}){clipped}")

    # ---- public API (any thread) ---------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Generation:
        """Queue a request; returns its handle at once. Raises LmforgeError for bad input, QueueFull."""
        params = (params or SamplingParams()).validate(self.vocab_size)
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise LmforgeError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise LmforgeError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        room = self.max_len - (1 if params.max_tokens > 0 else 0)  # max_tokens 0: the prompt alone may fill it
        if len(ids) > room:
            more = " (at least one more is needed to generate)" if params.max_tokens > 0 else ""
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_len} tokens, however the prompt has {len(ids)} "
                f"tokens{more}. Shorten the prompt.", len(ids), self.max_len)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        constraint = params.grammar.start() if params.grammar is not None else None  # here, not in the loop
        with self._cond:
            if self._stopping:
                raise LmforgeError("the engine has been stopped")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry shortly")
            rng = random.Random(params.seed if params.seed is not None else self._seed_rng.getrandbits(64))
            gen = Generation(self, next(self._ids), ids, params, stop_ids, rng)
            gen._constraint = constraint
            self._waiting.append(gen)
            self.stats.requests_total += 1
            self.stats.queue_length = len(self._waiting)
            self._cond.notify_all()
        return gen

    def cancel(self, gen: Generation) -> None:
        """Stop a request; its slot is freed before the next decode step. Safe to call twice or when done."""
        with self._cond:
            gen._cancel = True
            self._cond.notify_all()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None
                 = None) -> list[list[int]]:
        """Blocking convenience: submit all prompts, return each one's generated ids (drives step() if no thread)."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        gens = [self.submit(p, sp) for p, sp in zip(prompts, plist)]
        if not self.running:
            while not all(g.done for g in gens):
                self.step()
        return [g.result() for g in gens]

    def warmup(self, background: bool = False) -> float:
        """Compile (or load from the compile cache) the decode packages when compile=True, then run the prefill
        and decode paths once; returns the seconds it took. Leaves the slots empty.

        background: compile only the single-stream package now and the larger batch sizes in a daemon thread (a
        server is ready sooner); until a batch size's package is ready, its steps decode eagerly."""
        t = time.perf_counter()
        if self.compiled is not None:
            now = self._buckets[:1] if background else self._buckets
            self.compiled.warmup(self.max_batch, now, self.cache.dtype)
            if background and len(self._buckets) > 1:
                rest = self._buckets[1:]
                self._warming = threading.Thread(target=self.compiled.warmup, name="lmforge-compile", daemon=True,
                                                 args=(self.max_batch, rest, self.cache.dtype))
                self._warming.start()
        sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        self.generate([[0, 1]], sp)
        if self.max_batch > 1:
            self.generate([[0, 1], [2, 3, 4]], sp)
        self._slot_tokens = [[] for _ in range(self.max_batch)]
        self._decode_threads.reset()  # the warm-up's steps paid first-call costs: measure afresh
        self._prefill_threads.reset()
        return time.perf_counter() - t

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Engine:
        """Run the scheduler loop in a daemon thread."""
        if not self.running:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Cancel everything and end the loop thread."""
        with self._cond:
            self._stopping = True
            for g in list(self._waiting) + [g for g in self._slots if g is not None]:
                g._cancel = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.step()  # finalise what the thread left (no-op if it already did)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def queue_stats(self) -> dict:
        """Queue length, running batch size and whether larger batch sizes are still compiling in the background,
        right now: {"waiting": n, "running": n, "compiling": 0 or 1}."""
        warming = self._warming is not None and self._warming.is_alive()
        return {"waiting": len(self._waiting), "running": sum(g is not None for g in self._slots),
                "compiling": int(warming)}

    # ---- the scheduler (one thread) ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and all(g is None for g in self._slots):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug or out-of-memory: fail what is running, keep serving
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        for g in self._slots:
            if g is not None:
                self._finish(g, "error", error=message)

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduler iteration. Returns whether there was any work."""
        with self._cond:
            for g in self._slots:
                if g is not None and g._cancel:
                    self._finish(g, "cancelled")
            keep = deque()
            for g in self._waiting:
                if g._cancel:
                    self._finish(g, "cancelled")
                else:
                    keep.append(g)
            self._waiting = keep
            while self._waiting and None in self._slots:
                g = self._waiting.popleft()
                slot, reuse = self._choose_slot(g)
                self._slots[slot] = g
                g._slot, g._state, g._pos = slot, _PREFILL, reuse
                self.stats.prompt_tokens_reused += reuse
                if g.params.needs_penalties:
                    g._penalty = PenaltyState(self.vocab_size, g.prompt_ids, self.device)
            self.stats.queue_length = len(self._waiting)
            self.stats.running = sum(g is not None for g in self._slots)
        worked = self._prefill()
        worked = self._decode() or worked
        return worked

    def _choose_slot(self, g: Generation) -> tuple[int, int]:
        """(free slot, prompt tokens whose keys/values it already holds). The slot holding the longest prefix of
        the prompt wins; on a tie, the one holding the least beyond it (what is evicted is worth the least)."""
        best, best_key = -1, None
        for slot, occupant in enumerate(self._slots):
            if occupant is not None:
                continue
            held = self._slot_tokens[slot]
            # a prompt to score (prompt_logprobs) is prefilled from its first token; so is a request asking for
            # logprobs, whose first token's then come out as alone, to the bit (kept keys differ by rounding)
            reuse = self.prefix_reuse and g.prompt_logprobs is None and not g.params.logprobs
            match = _common_prefix(held, g.prompt_ids) if reuse else 0
            match = min(match, len(g.prompt_ids) - 1)  # the last prompt token is always run: it gives the logits
            key = (match, -(len(held) - match), -slot)
            if best_key is None or key > best_key:
                best, best_key = slot, key
        self._slot_tokens[best] = []  # the new occupant overwrites from `match` on
        return best, best_key[0]

    def _prefill(self) -> bool:
        budget = self.prefill_chunk
        todo = sorted((g for g in self._slots if g is not None and g._state == _PREFILL), key=lambda g: g.id)
        for g in todo:
            if budget <= 0:
                break
            t0 = time.perf_counter()
            key = min(budget, len(g.prompt_ids) - g._pos).bit_length()  # chunk-size class
            threads = self._prefill_threads.pick(key)
            set_threads(threads)
            try:  # a request's prefill is its own: its failure ends it alone
                took = self._prefill_one(g, budget)
                budget -= took
                self._prefill_threads.record(key, threads, time.perf_counter() - t0, took)
            except Exception as e:
                self._fail(g, e)
            self.stats.prefill_seconds += time.perf_counter() - t0
        return bool(todo)

    def _prefill_one(self, g: Generation, budget: int) -> int:
        """Prefill the next chunk (at most `budget` tokens) of g's prompt; returns the tokens it took."""
        start = g._pos
        chunk = g.prompt_ids[start:start + budget]
        T = len(chunk)
        last = start + T == len(g.prompt_ids)
        idx = torch.tensor([chunk], device=self.device)
        kw = dict(input_pos=start)
        if g._slot != 0:  # slot 0 is rows 0..0 of the cache: a view, no index tensor
            kw["slots"] = torch.tensor([g._slot], device=self.device)
        logits = None
        if g.prompt_logprobs is not None:  # every position's logits, for this chunk only
            all_logits = self._forward(idx, cache=self.cache, **kw)[0]  # T V
            self._score_prompt(g, start, all_logits)
            logits = all_logits[-1:]  # 1 V
        elif last and g.params.max_tokens > 0:
            logits = self._forward(idx, cache=self.cache, logits_index=torch.tensor([T - 1], device=self.device),
                                   **kw)[:, 0]  # 1 V
        else:
            self._forward(idx, cache=self.cache, return_hidden=True, **kw)  # fills the cache only
        g._pos = start + T
        if last:
            self.stats.prompt_tokens_total += len(g.prompt_ids)
            if g.params.max_tokens == 0:  # the prompt alone was asked for (scored, with prompt_logprobs)
                self._finish(g, "length")
            else:
                g._state = _DECODE
                self._emit([g], logits)
        return T

    def _score_prompt(self, g: Generation, start: int, logits: torch.Tensor) -> None:
        """Append the logprobs of the prompt tokens that the chunk's positions predict: logits [T, V] at
        positions start..start+T-1 score tokens start+1..start+T (those still inside the prompt)."""
        k = g.params.prompt_logprobs or 0
        if start == 0:
            g.prompt_logprobs.append(TokenEvent(g.prompt_ids[0]))  # nothing before it: no logprob (OpenAI: null)
        targets = g.prompt_ids[start + 1:start + 1 + logits.shape[0]]
        if not targets:
            return
        chosen, vals, tids = logprobs_of(logits[:len(targets)], torch.tensor(targets, device=logits.device), k)
        chosen_l = chosen.tolist()
        tops = list(zip(tids.tolist(), vals.tolist())) if vals is not None else None
        for j, t in enumerate(targets):
            alts = list(zip(*tops[j])) if tops is not None else None
            g.prompt_logprobs.append(TokenEvent(t, chosen_l[j], alts))

    def _decode(self) -> bool:
        rows = [g for g in self._slots if g is not None and g._state == _DECODE]
        if not rows:
            return False
        t0 = time.perf_counter()
        try:
            picks = self._pick(rows, self._decode_logits(rows))
        except Exception:  # one row's input (or a bug it triggers) must not fail its neighbours: retry alone
            log.warning("batched decode step failed; retrying its %d rows one by one", len(rows), exc_info=True)
            rows, picks = self._decode_alone(rows)
        for g in rows:
            g._pos += 1
        self._deliver(rows, picks)
        dt = time.perf_counter() - t0
        self.stats.decode_steps += 1
        self.stats.decode_seconds += dt
        self.stats.decode_tokens += len(rows)
        self.stats.last_tokens_per_s = len(rows) / dt if dt > 0 else 0.0
        return True

    def _decode_logits(self, rows: list[Generation]) -> torch.Tensor:
        """One batched decode forward: the next-token logits [R, V] of the decoding rows."""
        n = max(g._slot for g in rows) + 1
        compiled = self.compiled is not None and self.compiled.is_warm(self.max_batch, self._bucket(n))
        key = (1 << (n - 1).bit_length(), compiled)  # batch-size class, compiled or eager
        threads = self._decode_threads.pick(key)
        set_threads(threads)
        t0 = time.perf_counter()
        logits = self._decode_forward(rows, n, compiled)
        self._decode_threads.record(key, threads, time.perf_counter() - t0)
        return logits

    def _bucket(self, n: int) -> int:
        return next(b for b in self._buckets if b >= n)

    def _decode_forward(self, rows: list[Generation], n: int, compiled: bool) -> torch.Tensor:
        if compiled:
            toks, pos, live = [0] * n, [0] * n, [False] * n  # free or prefilling rows below n write nothing
            for g in rows:
                toks[g._slot], pos[g._slot], live[g._slot] = g._last, g._pos, True
            logits = self.compiled(self.cache, toks, pos, live, self._buckets)  # n V
        elif n == 1:  # single-stream fast path
            g = rows[0]
            return self._forward(torch.tensor([[g._last]], device=self.device), input_pos=g._pos,
                                 cache=self.cache)[:, -1]  # 1 V
        else:
            toks, pos = [0] * n, [0] * n
            for g in rows:
                toks[g._slot], pos[g._slot] = g._last, g._pos
            write = None
            if len(rows) != n:  # free or prefilling rows below n write nothing (a free slot keeps its prefix)
                write = torch.zeros(n, dtype=torch.bool, device=self.device)
                write[torch.tensor([g._slot for g in rows], device=self.device)] = True
            logits = self._forward(torch.tensor(toks, device=self.device)[:, None],
                                   input_pos=torch.tensor(pos, device=self.device)[:, None],
                                   cache=self.cache, cache_len=max(pos) + 1, write_mask=write)[:, -1]  # n V
        if len(rows) != n:
            logits = logits[torch.tensor([g._slot for g in rows], device=self.device)]
        return logits

    def _decode_alone(self, rows: list[Generation]) -> tuple[list[Generation], list[tuple]]:
        """The decode step again, one row at a time (its own slot and position): the rows that fail alone end
        with an error; the others get their token. Rewriting a row's cache entry is idempotent (same token,
        same position), so the failed batched attempt leaves nothing behind."""
        ok, picks = [], []
        for g in rows:
            try:
                logits = self._forward(torch.tensor([[g._last]], device=self.device),
                                       input_pos=torch.tensor([[g._pos]], device=self.device), cache=self.cache,
                                       slots=torch.tensor([g._slot], device=self.device),
                                       cache_len=g._pos + 1)[:, -1]  # 1 V
                picks += self._pick([g], logits)
                ok.append(g)
            except Exception as e:
                self._fail(g, e)
        return ok, picks

    def _emit(self, rows: list[Generation], logits: torch.Tensor) -> None:
        """Sample one token per row from logits [R, V], hand out events, finish and free what is done."""
        self._deliver(rows, self._pick(rows, logits))

    def _pick(self, rows: list[Generation], logits: torch.Tensor) -> list[tuple[int, float | None, list | None]]:
        """(token, logprob, top alternatives) per row for logits [R, V]: the sampling, all of the step that
        depends on each request's own parameters."""
        logits = logits.float()
        params = [g.params for g in rows]
        constraints = [g._constraint for g in rows]
        # a grammar's mask only where a row has one: unconstrained batches pay one any() per step
        allowed = allowed_tokens(constraints, logits.shape[-1], logits.device) if any(constraints) else None
        ids = sample(logits, params, [g._rng for g in rows], [g._penalty for g in rows], allowed)
        lp_rows = [i for i, p in enumerate(params) if p.logprobs]
        lp: dict[int, tuple[float, list[tuple[int, float]] | None]] = {}
        if lp_rows:
            sel = torch.tensor(lp_rows, device=logits.device)
            top = max(params[i].top_logprobs for i in lp_rows)
            chosen, vals, tids = logprobs_of(logits[sel], ids[sel], top)
            chosen_l = chosen.tolist()
            vals_l, tids_l = (vals.tolist(), tids.tolist()) if vals is not None else (None, None)
            for j, i in enumerate(lp_rows):
                k = params[i].top_logprobs
                alts = list(zip(tids_l[j][:k], vals_l[j][:k])) if k and vals_l is not None else None
                lp[i] = (chosen_l[j], alts)
        return [(tok, *lp.get(i, (None, None))) for i, tok in enumerate(ids.tolist())]  # the step's host sync

    def _deliver(self, rows: list[Generation], picks: list[tuple[int, float | None, list | None]]) -> None:
        """Hand each row its picked token as an event; finish and free the rows that are done."""
        now = time.perf_counter()
        for g, (tok, logprob, alts) in zip(rows, picks):
            g.output_ids.append(tok)
            g._last = tok
            if g._penalty is not None:
                g._penalty.update(tok)
            if g.t_first is None:
                g.t_first = now
                ttft = now - g.t_submit
                self.stats.ttft_sum += ttft
                self.stats.ttft_count += 1
                b = bisect.bisect_left(TTFT_BUCKETS, ttft)
                if b < len(TTFT_BUCKETS):
                    self.stats.ttft_hist[b] += 1
            self.stats.generation_tokens_total += 1
            reason = None
            if g._constraint is not None:
                try:
                    g._constraint.advance(tok)
                except LmforgeError as e:
                    self._finish(g, "error", error=str(e))
                    continue
            if tok in g._stop_ids:
                reason = "stop"
            elif g._constraint is not None and g._constraint.finished:
                reason = "stop"  # the grammar is complete: nothing more may follow
            elif len(g.output_ids) >= g.params.max_tokens or len(g.prompt_ids) + len(g.output_ids) >= self.max_len:
                reason = "length"  # prompt + output may not exceed the context
            ev = TokenEvent(tok, logprob, alts, reason)
            if reason is not None:
                self._finish(g, reason, event=ev)
            else:
                g._push(ev)

    def _fail(self, g: Generation, e: Exception) -> None:
        """End one request with an error event (its slot frees); the engine goes on."""
        log.error("request %d failed: %s: %s", g.id, type(e).__name__, e, exc_info=e)
        self._finish(g, "error", error=f"{type(e).__name__}: {e}")

    def _finish(self, g: Generation, reason: str, event: TokenEvent | None = None, error: str | None = None) -> None:
        if g._state == _DONE:
            return
        g._state = _DONE
        g.finish_reason = reason
        g.t_done = time.perf_counter()
        if 0 <= g._slot < len(self._slots) and self._slots[g._slot] is g:
            self._slots[g._slot] = None  # the slot is free for the next admission
            # what the cache holds for it stays, for a later prompt that starts the same way (not after a failure:
            # a forward that raised may have written part of a step)
            self._slot_tokens[g._slot] = [] if reason == "error" else (g.prompt_ids + g.output_ids)[:g._pos]
        self.stats.requests_finished += 1
        g._push(event or TokenEvent(None, finish_reason=reason, error=error))
