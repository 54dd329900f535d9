"""What every request handler reads: the served models, their engines, readiness, the server's settings.

Owns: `EngineOptions` (the engine parameters every served model gets, as typed fields) and `ServerState`
(models and engines by served name, retrieval hooks, the API key, body limit and prompt time limit, readiness
or the loading error, the HTTP counters, the fine-tuning job runner). Models may be added while the server
runs (`add_model`). The app keeps one ServerState in `app.state.lmforge`; handlers reach it with
`server(request)`. Loading in a background thread lives here too, so /health can say 503 until it is done.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from lmforge.errors import LmforgeError
from lmforge.inference.engine import Engine
from lmforge.inference.load import LoadedModel
from lmforge.serve.metrics import Metrics

log = logging.getLogger("lmforge.serve")


@dataclass(frozen=True)
class EngineOptions:
    """How each served model's Engine is built (see inference/engine.py for what each one means)."""

    max_batch: int = 8  # requests decoded together (KV cache slots)
    max_queue: int = 64  # requests that may wait for a slot before a 429
    max_len: int | None = None  # context served (None: the model's max_seq_len)
    prefill_chunk: int = 512  # prompt tokens prefilled per scheduler step
    compile: bool = False  # compile the decode step (compiled before /health says ready)
    threads: int | str | None = None  # CPU threads for decode: a number, "auto" (measured), None (torch's setting)
    prefill_threads: int | str | None = None  # CPU threads for prefill (None: as for decode)
    kv_memory: int | None = None  # KV cache budget in bytes (None: the context, up to a share of free memory)

    def engine(self, lm: LoadedModel) -> Engine:
        engine = Engine(lm.model, eos_ids=lm.eos_ids, max_batch=self.max_batch, max_queue=self.max_queue,
                        max_len=self.max_len, prefill_chunk=self.prefill_chunk, compile=self.compile,
                        threads=self.threads, prefill_threads=self.prefill_threads, kv_memory=self.kv_memory)
        print(f"{lm.name}: {engine.cache_summary()}", file=sys.stderr)
        if engine.compiled is not None:
            # compile now, not on the first user's request: one stream before ready, larger batches in the background
            print(f"{lm.name}: compiled the decode step in {engine.warmup(background=True):.1f} s (larger batch "
                  f"sizes compile in the background)", file=sys.stderr)
        return engine


# served name -> factory(tokenizer) of a retrieval hook (messages, prompt budget) -> (messages, sources)
RagFactory = Callable[[object], Callable]


@dataclass
class ServerState:
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    api_key: str | None = None  # None: /v1 is open
    max_body_bytes: int = 2_000_000
    prompt_timeout: float = 10.0  # seconds a request's chat template + tokenization may take
    rag_factories: dict[str, RagFactory] = field(default_factory=dict)
    models: dict[str, LoadedModel] = field(default_factory=dict)
    engines: dict[str, Engine] = field(default_factory=dict)
    augment: dict[str, Callable] = field(default_factory=dict)  # served name -> retrieval hook
    ready: bool = False
    load_error: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    embedder: object | None = None  # the sentence encoder of /v1/embeddings, loaded on its first request
    jobs: Any = None  # the fine-tuning JobRunner (jobs/runner.py), or None when the server has no jobs dir
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, models: dict[str, LoadedModel]) -> None:
        """Start an engine for each model (and open its retrieval index); then the server is ready."""
        for name, lm in models.items():
            self.add_model(name, lm)
        self.ready = True

    def add_model(self, name: str, lm: LoadedModel) -> None:
        """Serve one more model, from any thread, while requests run (a fine-tuned model the moment its job
        succeeds). The dicts are replaced, never changed in place, so a handler iterating them is unaffected."""
        with self._lock:
            if name in self.engines:
                return
            engine = self.engine_options.engine(lm).start()
            if name in self.rag_factories:
                self.augment = {**self.augment, name: self.rag_factories[name](lm.tokenizer)}
            self.models = {**self.models, name: lm}
            self.engines = {**self.engines, name: engine}

    def load_in_background(self, loader: Callable[[], dict[str, LoadedModel]]) -> None:
        """Run `loader` in a thread and add what it returns; a failure is kept for /health, not raised."""

        def load_all():
            try:
                self.add(loader())
            except LmforgeError as e:
                self.load_error = str(e)
                log.error("loading failed: %s", e)
            except Exception as e:  # report it on /health instead of dying silently in a thread
                self.load_error = f"{type(e).__name__}: {e}"
                log.exception("loading failed")

        threading.Thread(target=load_all, name="lmforge-loader", daemon=True).start()

    def stop(self) -> None:
        for e in self.engines.values():
            e.stop()


def server(request: Request) -> ServerState:
    """The ServerState of the app this request came to."""
    return request.app.state.lmforge
