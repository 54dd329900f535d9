"""`lmforge chat`: a terminal chat with a model: the reply streams token by token, the conversation is kept.

Commands typed at the prompt: /reset (forget the conversation), /system TEXT (set the system prompt and
reset), /exit (or Ctrl-D). Ctrl-C while a reply streams stops that reply and keeps what was said.
Each turn re-renders the whole conversation with the model's chat template, as the server does; when the
conversation outgrows the context, the oldest turns are dropped (the system prompt stays).

Owns the REPL only; the text layer is generate.py, the tokens come from the Engine. Retrieval (`--rag`) comes in
from above as an `augment` callable (rag/chat.py builds it), so this layer never imports rag.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from lmforge.config import opt
from lmforge.errors import LmforgeError
from lmforge.inference.generate import chat_ids, need_tokenizer, stream_text
from lmforge.inference.sampling import SamplingOptions

HELP = "commands: /reset  /system TEXT  /exit   (Ctrl-C stops a reply)"


@dataclass
class ChatConfig:
    model: str = opt("", "model directory (Hugging Face layout, with a chat template), a .gguf file, or "
                     "a packaged model name (smollm2-135m-instruct)")
    system: str = opt("", "system prompt")
    max_new_tokens: int = opt(512, "most tokens per reply")
    sampling: SamplingOptions = opt(default_factory=lambda: SamplingOptions(temperature=0.7))
    quantize: str | None = opt(None, "weight-only quantization of every projection and the output head",
                               choices=["int8", "int4"])
    dtype: str = opt("float32", "weights and activations dtype", choices=["float32", "bfloat16", "float16"])
    stats: bool = opt(True, "print tokens/s after each reply (to stderr)")
    compile: bool = opt(True, "compile the decode step at start (a model's first compile takes minutes, cached "
                              "after; --no-compile starts at once and decodes slower)")
    threads: int = opt(0, "CPU threads for decode (0 = chosen for this machine)")
    prefill_threads: int = opt(0, "CPU threads for the prompt (0 = chosen for this machine)")
    kv_cache_memory: str | None = opt(None, "KV cache budget, e.g. 2GB or 30% (of free memory); default: the "
                                            "context, up to 25% of free memory")


def fit_history(tokenizer, system: str, turns: list[dict], max_prompt: int) -> tuple[list[int], list[dict]]:
    """Prompt ids for the conversation, dropping the oldest user/assistant pairs until it fits."""
    turns = list(turns)
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        ids = chat_ids(tokenizer, messages)
        if len(ids) <= max_prompt or len(turns) <= 1:
            return ids, turns
        turns = turns[2:] if len(turns) > 2 else turns[1:]


# messages, prompt-token budget -> (messages to generate from, sources to cite)
Augment = Callable[[list[dict], int], tuple[list[dict], list[dict]]]


def repl(engine, tokenizer, cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None,
         augment: Augment | None = None) -> None:
    """The loop, over any text streams (default: the process's; tests drive it with StringIO).

    augment: retrieval for the newest user turn; the history keeps the user's own words, not the sources.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    interactive = stdin.isatty()
    system, turns = cfg.system, []
    print(f"lmforge chat  ({HELP})", file=sys.stderr)
    while True:
        if interactive:
            stdout.write("\n> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            turns = []
            print("[conversation reset]", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system, turns = text[len("/system"):].strip(), []
            print(f"[system prompt set{'' if system else ' (empty)'}; conversation reset]", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"[unknown command; {HELP}]", file=sys.stderr)
            continue
        turns.append({"role": "user", "content": text})
        ids, turns = fit_history(tokenizer, system, turns, engine.max_len - 1)
        sources: list[dict] = []
        if augment is not None:
            plain = ([{"role": "system", "content": system}] if system else []) + turns
            messages, sources = augment(plain, engine.max_len - min(cfg.max_new_tokens, engine.max_len // 2))
            ids = chat_ids(tokenizer, messages)
        if len(ids) >= engine.max_len:
            print(f"[message too long for the {engine.max_len}-token context]", file=sys.stderr)
            turns.pop()
            continue
        gen = engine.submit(ids, cfg.sampling.params(min(cfg.max_new_tokens, engine.max_len - len(ids))))
        reply, n, t0 = [], 0, time.perf_counter()
        try:
            for d in stream_text(gen, tokenizer):
                stdout.write(d.text)
                stdout.flush()
                reply.append(d.text)
                n = d.completion_tokens
        except KeyboardInterrupt:
            gen.cancel()
            stdout.write(" [stopped]")
        stdout.write("\n")
        stdout.flush()
        turns.append({"role": "assistant", "content": "".join(reply)})
        if sources:
            print("sources:\n" + "\n".join(f"  [{x['n']}] {x['source']}:{x['start']}-{x['end']} "
                                           f"(score {x['score']:.2f})" for x in sources), file=sys.stderr)
        if cfg.stats and gen.t_first is not None:
            dt = time.perf_counter() - t0
            rate = (n - 1) / max((gen.t_done or time.perf_counter()) - gen.t_first, 1e-9) if n > 1 else 0.0
            print(f"[{n} tokens in {dt:.2f}s, {rate:.1f} tokens/s]", file=sys.stderr)


def run(cfg: ChatConfig, augment: Augment | None = None) -> int:
    from lmforge.inference.engine import Engine, engine_kwargs
    from lmforge.inference.load import load

    if not cfg.model:
        raise LmforgeError("--model DIR is required (a model directory with a chat template)")
    lm = load(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize)
    tok = need_tokenizer(lm.tokenizer, "chat")
    if tok.chat_template is None:
        raise LmforgeError(f"{cfg.model} has no chat template (tokenizer_config.json chat_template); use "
                           "`lmforge generate` for plain text, or a chat/instruct model")
    engine = Engine(lm.model, max_batch=1, eos_ids=lm.eos_ids, compile=cfg.compile,
                    **engine_kwargs(cfg.threads, cfg.prefill_threads, cfg.kv_cache_memory, lm.model))
    print(engine.cache_summary(), file=sys.stderr)
    if engine.compiled is not None:
        print("compiling the decode step (--no-compile skips it)...", file=sys.stderr, flush=True)
        print(f"compiled in {engine.warmup():.1f} s", file=sys.stderr)
    with engine:
        try:
            repl(engine, tok, cfg, augment=augment)
        except KeyboardInterrupt:
            pass
    return 0
