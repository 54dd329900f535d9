"""A model directory opened for evaluation: prompt ids, log-likelihood scoring, greedy generation with timings.

Loading, prompt encoding, stop ids and text streaming are inference's (inference.load.load, generate.completion_ids
/ chat_ids / stream_text), so eval measures exactly what `lmforge generate` and `serve` give a user.

Scoring (choice metric) calls the model's forward directly: the context once into a KV cache, then every
continuation on top of a copy of it, right-padded (a causal model never looks right, so padding changes nothing
before it).
Generation goes through the Engine, greedy, with at most `concurrency` requests in flight (one worker thread per
request slot, the engine's scheduler in its own thread): each request's latency is measured from submission to
its last text, so with concurrency 1 it is the latency one user sees, and tokens/s over the run is the throughput
a query is priced at. Stop strings are inference's: the request is cancelled when one completes, and the text
ends before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import LmforgeError


@dataclass
class Generated:
    """One generation: the text (cut at a stop string), token counts and the seconds it took."""

    text: str
    prompt_tokens: int
    output_tokens: int
    latency_s: float
    finish_reason: str


class EvalModel:
    """A loaded checkpoint (model + tokenizer + stop ids) and the scoring/generation calls eval needs."""

    def __init__(self, path: str | Path, dtype: str | None = None, device: str = "cpu", compile: bool = False):
        from lmforge.inference.generate import need_tokenizer
        from lmforge.inference.load import load

        p = Path(path)
        self.loaded = load(p, dtype=dtype or "float32")  # a directory, a .gguf file or a packaged model name
        self.path = p
        try:
            self.model = self.loaded.model.to(device)
        except (RuntimeError, AssertionError) as e:
            raise LmforgeError(f"cannot put the model on device {device!r}: {e}") from None
        self.tokenizer = need_tokenizer(self.loaded.tokenizer, "evaluation")
        self.device = next(self.model.parameters()).device
        self.max_len = int(self.model.cfg.max_seq_len)
        self.stop_ids = list(self.loaded.eos_ids)
        self.compile = compile  # the Engine's compiled decode step for generation (inference/decode.py)

    # ---- prompts ----------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer.chat_template is not None

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt, as `lmforge generate` encodes it."""
        from lmforge.inference.generate import completion_ids

        return completion_ids(self.tokenizer, text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of chat messages with the assistant turn opened, as `lmforge chat` / serve encode them."""
        from lmforge.inference.generate import chat_ids

        return chat_ids(self.tokenizer, messages)

    def render_chat(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def count_chat(self, messages: list[dict]) -> int:
        return len(self.encode_chat(messages))

    def count_text(self, text: str) -> int:
        return len(self.encode_prompt(text))

    # ---- scoring ----------------------------------------------------------------------------------------
    def continuation_logprobs(self, context: list[int], continuations: list[list[int]]) -> list[float]:
        """Sum of log p(continuation tokens | context) for each continuation.

        The context runs once, into a KV cache whose keys and values are then copied to one row per continuation,
        and the continuations run together on top of it (right-padded: a causal model never looks right). So an
        item costs its context once plus its choices, not its context once per choice: with a long retrieved or
        few-shot context, 4-way multiple choice runs about 3-4x faster than scoring each choice from scratch.
        When context + continuation is longer than the model's context, the context loses its oldest tokens.
        """
        if not continuations or any(not c for c in continuations):
            raise LmforgeError("every continuation needs at least one token")
        longest = max(len(c) for c in continuations)
        if longest >= self.max_len:
            raise LmforgeError(f"a continuation of {longest} tokens does not fit the model's {self.max_len}-token context")
        ctx = context[-(self.max_len - longest):] if len(context) + longest > self.max_len else context
        if not ctx:
            raise LmforgeError("scoring needs a non-empty context: the prompt encodes to no tokens")
        n, width = len(continuations), longest
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        cont = torch.full((n, width), pad, dtype=torch.long)
        for i, c in enumerate(continuations):
            cont[i, :len(c)] = torch.tensor(c)
        cont = cont.to(self.device)
        with torch.inference_mode():
            cache = self.model.new_cache(n, len(ctx) + width)
            first = self.model(torch.tensor([ctx], device=self.device), input_pos=0, cache=cache,
                               logits_index=torch.tensor([len(ctx) - 1], device=self.device))  # 1 1 V
            for layer in range(len(cache.k)):  # every row (slot) starts from the same context
                cache.k[layer][1:, :, :len(ctx)] = cache.k[layer][:1, :, :len(ctx)]
                cache.v[layer][1:, :, :len(ctx)] = cache.v[layer][:1, :, :len(ctx)]
            rest = self.model(cont, input_pos=len(ctx), cache=cache)  # n T V: position j predicts token j + 1
            logp = torch.log_softmax(torch.cat([first.expand(n, 1, -1), rest[:, :-1]], dim=1).float(), dim=-1)
        out = []
        for i, c in enumerate(continuations):
            out.append(float(logp[i, torch.arange(len(c)), cont[i, :len(c)]].sum()))
        return out

    # ---- generation -------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop: list[str] | None = None,
                 concurrency: int = 1, on_done: Callable[[int, Generated], None] | None = None) -> list[Generated]:
        """Greedy completions of token-id prompts, `concurrency` at a time; on_done(i, result) as each finishes
        (called from one thread at a time)."""
        import threading
        from concurrent.futures import ThreadPoolExecutor

        from lmforge.inference.engine import ContextLengthExceeded, Engine
        from lmforge.inference.generate import stream_text
        from lmforge.inference.sampling import SamplingParams

        if concurrency < 1:
            raise LmforgeError(f"concurrency must be at least 1, got {concurrency}")
        for i, p in enumerate(prompts):
            if len(p) >= self.max_len:
                raise LmforgeError(f"example {i + 1}: its prompt has {len(p)} tokens, the model's context "
                                   f"{self.max_len}; shorten it")
        engine = Engine(self.model, max_batch=concurrency, max_len=self.max_len, eos_ids=self.stop_ids,
                        compile=self.compile)
        if engine.compiled is not None:
            engine.warmup()  # compiled once per model and batch size in this process; cached on disk after
        lock = threading.Lock()
        results: list[Generated | None] = [None] * len(prompts)

        def one(i: int) -> None:
            ids = prompts[i]
            params = SamplingParams(max_tokens=max(1, min(max_new_tokens, self.max_len - len(ids))), temperature=0.0)
            t0 = time.perf_counter()
            try:
                gen = engine.submit(ids, params)
            except ContextLengthExceeded as e:
                raise LmforgeError(f"example {i + 1}: {e}") from None
            parts, n, reason, error = [], 0, None, None
            for d in stream_text(gen, self.tokenizer, stop or ()):
                parts.append(d.text)
                n, reason, error = d.completion_tokens, d.finish_reason or reason, d.error or error
            if reason == "error":
                raise LmforgeError(f"generation failed on example {i + 1}: {error}")
            r = Generated("".join(parts), len(ids), n, time.perf_counter() - t0, reason or "length")
            results[i] = r
            if on_done is not None:
                with lock:
                    on_done(i, r)

        engine.start()
        try:
            with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="lmforge-eval") as pool:
                for f in [pool.submit(one, i) for i in range(len(prompts))]:
                    f.result()  # re-raises a worker's error
        finally:
            engine.stop()
        return results  # type: ignore[return-value]
