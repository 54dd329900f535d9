"""Text on top of the Engine: prompts and chat messages to token ids, token events to streamed text with stop
strings, and the `lmforge generate` verb.

Owns: `TextAssembler` (token events -> text deltas; stop strings are never emitted, even when one is split
across tokens: text that could still become a stop string is held back until it cannot), `stream_text` /
`astream_text` over a submitted Generation (they cancel it when a stop string ends it or the consumer stops
reading), `completion_ids` / `chat_ids`, and GenerateConfig + run.
Leaves to engine.py the tokens, to the tokenizer the chat template and incremental UTF-8-safe decoding.

usage counts every token the model produced up to and including the one that completed a stop string or was
an EOS id; that EOS's text is not part of the reply.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

from lmforge.config import opt
from lmforge.errors import LmforgeError
from lmforge.inference.engine import Generation, TokenEvent
from lmforge.inference.sampling import SamplingOptions


@dataclass
class TextDelta:
    """New reply text, the token events it came from, and the finish reason on the last delta."""

    text: str
    tokens: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0  # running count of generated tokens
    error: str | None = None


class TextAssembler:
    """Turns one sequence's TokenEvents into text deltas, cutting at the first stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), stop_ids: Sequence[int] = ()):
        self._decoder = tokenizer.stream_decoder()
        self.stop = [s for s in stop if s]
        self._stop_ids = set(stop_ids)
        self._text = ""  # all decoded text so far
        self._emitted = 0  # self._text[:_emitted] has been handed out
        self.n_tokens = 0
        self.finish_reason: str | None = None

    def _held(self) -> int:
        """Length of the longest tail of the unemitted text that is a proper prefix of some stop string."""
        tail = self._text[self._emitted:]
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best

    def feed(self, ev: TokenEvent) -> TextDelta | None:
        """Consume one event; a delta to hand out (None if nothing new), finish_reason set when it ends here."""
        if self.finish_reason is not None:
            return None
        if ev.token is not None:
            self.n_tokens += 1
            is_eos = ev.finish_reason == "stop" and ev.token in self._stop_ids
            if not is_eos:
                self._text += self._decoder.push(ev.token)
        if ev.finish_reason is not None:
            self._text += self._decoder.flush()
        if self.stop:
            cut = min((i for i in (self._text.find(s, self._emitted) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                out = self._text[self._emitted:cut]
                self._emitted = len(self._text)
                self.finish_reason = "stop"
                return TextDelta(out, [ev], "stop", self.n_tokens)
        if ev.finish_reason is not None:
            out = self._text[self._emitted:]
            self._emitted = len(self._text)
            self.finish_reason = ev.finish_reason
            return TextDelta(out, [ev] if ev.token is not None else [], ev.finish_reason, self.n_tokens, ev.error)
        end = len(self._text) - (self._held() if self.stop else 0)
        out = self._text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return TextDelta(out, [ev], None, self.n_tokens)


def stream_text(gen: Generation, tokenizer, stop: Sequence[str] = ()) -> Iterator[TextDelta]:
    """Text deltas of a submitted generation (blocking iterator). The last delta has finish_reason set."""
    asm = TextAssembler(tokenizer, stop, gen.stop_ids)
    try:
        for ev in gen:
            d = asm.feed(ev)
            if d is not None:
                yield d
                if d.finish_reason is not None:
                    return
    finally:
        if not gen.done:
            gen.cancel()  # a stop string ended it, or the consumer went away: free the slot


async def astream_text(gen: Generation, tokenizer, stop: Sequence[str] = ()) -> AsyncIterator[TextDelta]:
    """stream_text for asyncio consumers (the server)."""
    asm = TextAssembler(tokenizer, stop, gen.stop_ids)
    try:
        async for ev in gen:
            d = asm.feed(ev)
            if d is not None:
                yield d
                if d.finish_reason is not None:
                    return
    finally:
        if not gen.done:
            gen.cancel()


def need_tokenizer(tokenizer, what: str = "text generation"):
    if tokenizer is None:
        raise LmforgeError(f"{what} needs a tokenizer, and this model directory has none (tokenizer.json); "
                           "copy the tokenizer files into it")
    return tokenizer


def completion_ids(tokenizer, prompt: str) -> list[int]:
    """A raw-text prompt as the model sees it (the tokenizer's own BOS handling included)."""
    return need_tokenizer(tokenizer).encode(prompt, add_special_tokens=True)


def chat_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Chat messages (and the tools the model may call, OpenAI's shape) through the tokenizer's chat template,
    with the assistant turn opened. A call's arguments given as JSON text reach the template as an object."""
    from lmforge.inference.tools import prepare_messages

    text = need_tokenizer(tokenizer, "chat").apply_chat_template(prepare_messages(messages),
                                                                 add_generation_prompt=True, tools=tools)
    return tokenizer.encode(text, add_special_tokens=False)  # the template writes its own BOS, as HF does


# ---- the `lmforge generate` verb ----------------------------------------------------------------------
@dataclass
class GenerateConfig:
    model: str = opt("", "model directory (Hugging Face layout, as lmforge writes it), a .gguf file, or a "
                     "packaged model name (smollm2-135m-instruct)")
    prompt: str = opt("", "prompt text; '-' reads it from stdin (one trailing newline dropped)")
    max_new_tokens: int = opt(128, "most tokens to generate")
    sampling: SamplingOptions = opt(default_factory=SamplingOptions)
    chat: bool = opt(False, "wrap the prompt as a user message in the model's chat template")
    system: str = opt("", "system prompt (with --chat)")
    stop: list[str] = opt(help="stop string (repeatable); never printed", default_factory=list)
    quantize: str | None = opt(None, "weight-only quantization of every projection and the output head",
                               choices=["int8", "int4"])
    dtype: str = opt("float32", "weights and activations dtype", choices=["float32", "bfloat16", "float16"])
    compile: bool = opt(False, "compile the decode step: faster per token, but a model's first compile takes "
                               "minutes (cached: later starts take seconds), so it pays for long generations")
    threads: int = opt(0, "CPU threads for decode (0 = chosen for this machine)")
    prefill_threads: int = opt(0, "CPU threads for the prompt (0 = chosen for this machine)")
    max_len: int | None = opt(None, "context length: prompt + new tokens (default: the model's max_seq_len, "
                                    "as far as the KV cache budget buys)")
    kv_cache_memory: str | None = opt(None, "KV cache budget, e.g. 2GB or 30% (of free memory); default: the "
                                            "context, up to 25% of free memory")


def read_prompt(prompt: str) -> str:
    """The prompt as given, or stdin's text for '-' without the one newline that ends what a shell sends
    (`echo ... |`, a heredoc): it would be one more token and change the answer."""
    if prompt != "-":
        return prompt
    text = sys.stdin.read()
    return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")


def run(cfg: GenerateConfig) -> int:
    from lmforge.inference.engine import Engine
    from lmforge.inference.load import load

    if not cfg.model:
        raise LmforgeError("--model DIR is required (a model directory)")
    prompt = read_prompt(cfg.prompt)
    if not prompt and not cfg.chat:
        raise LmforgeError("--prompt TEXT is required ('-' reads stdin)")
    from lmforge.inference.engine import engine_kwargs

    lm = load(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize)
    tok = need_tokenizer(lm.tokenizer)
    if cfg.chat:
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else [])
        ids = chat_ids(tok, messages + [{"role": "user", "content": prompt}])
    else:
        ids = completion_ids(tok, prompt)
    params = cfg.sampling.params(cfg.max_new_tokens)
    engine = Engine(lm.model, max_batch=1, max_len=cfg.max_len, eos_ids=lm.eos_ids, compile=cfg.compile,
                    **engine_kwargs(cfg.threads, cfg.prefill_threads, cfg.kv_cache_memory, lm.model))
    print(engine.cache_summary(), file=sys.stderr)
    if engine.compiled is not None:
        print(f"compiled the decode step in {engine.warmup():.1f} s", file=sys.stderr)
    gen = engine.submit(ids, params)
    engine.start()
    t0 = time.perf_counter()
    n = 0
    reason = error = None
    try:
        for d in stream_text(gen, tok, cfg.stop):
            sys.stdout.write(d.text)
            sys.stdout.flush()
            n, reason, error = d.completion_tokens, d.finish_reason or reason, d.error or error
    finally:
        engine.stop()
    sys.stdout.write("\n")
    sys.stdout.flush()  # the text ends before the stats line on stderr, also when both go to one pipe
    dt = time.perf_counter() - t0
    ttft = (gen.t_first - gen.t_submit) if gen.t_first else float("nan")
    decode_s = (gen.t_done or time.perf_counter()) - (gen.t_first or t0)
    rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan")
    print(f"[{len(ids)} prompt tokens, {n} generated in {dt:.2f}s; first token {ttft * 1000:.0f} ms, "
          f"decode {rate:.1f} tokens/s; finish: {reason}]", file=sys.stderr)
    if reason == "error":  # the engine ended it: say so, and exit non-zero (scripts check the status)
        print(f"error: generation failed: {error}", file=sys.stderr)
        return 1
    return 0
