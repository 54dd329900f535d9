"""Time to first token over a 5-turn chat, with and without prefix reuse (the Engine keeps a finished request's
keys and values in its slot; the next turn, whose prompt starts with the whole conversation so far, prefills
only what is new).

    python benchmarks/bench_prefix.py                       # SmolLM2-135M-Instruct, 2 threads
    python benchmarks/bench_prefix.py --model DIR --turns 5 --threads 2 --repeats 3 --json out.json

Each turn renders the conversation with the model's chat template (system prompt + every earlier turn + the new
user message, as `lmforge chat` and the server do), submits it, and greedily generates up to --reply-tokens
tokens; the reply joins the history. TTFT is the request's own submit -> first token. Both modes see the same
turns and must give the same replies (checked). The modes alternate, best of --repeats per turn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SYSTEM = ("You are a careful assistant for a team of engineers. Answer in plain English, in at most three "
          "sentences, and say so when you are not sure. The team works on a Python toolkit that trains, finetunes "
          "and serves small language models on laptops; its users care about speed on CPUs, memory use, and "
          "reproducible results. When a question is about code, prefer short examples. Never invent APIs.")
TURNS = ["What is a KV cache?", "Why does it grow with the context?", "How much memory does a 135M model need "
         "for 2048 tokens?", "Can two requests share one?", "Summarise what we discussed in one sentence."]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--reply-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from lmforge.inference.engine import Engine
    from lmforge.inference.generate import chat_ids
    from lmforge.inference.load import load
    from lmforge.inference.sampling import SamplingParams

    lm = load(args.model)
    tok = lm.tokenizer
    sp = SamplingParams(temperature=0.0, max_tokens=args.reply_tokens)

    def conversation(reuse: bool) -> list[dict]:
        eng = Engine(lm.model, max_batch=2, eos_ids=lm.eos_ids, prefix_reuse=reuse, threads=args.threads,
                     prefill_threads=args.threads)
        eng.generate([chat_ids(tok, [{"role": "user", "content": "hi"}])], sp.replace(max_tokens=2))  # warm-up
        history = [{"role": "system", "content": SYSTEM}]
        out = []
        for text in (TURNS * 2)[:args.turns]:
            history.append({"role": "user", "content": text})
            ids = chat_ids(tok, history)
            before = eng.stats.prompt_tokens_reused
            g = eng.submit(ids, sp)
            while not g.done:
                eng.step()
            reply = tok.decode([t for t in g.output_ids if t not in g.stop_ids])
            history.append({"role": "assistant", "content": reply})
            out.append({"prompt_tokens": len(ids), "reused": eng.stats.prompt_tokens_reused - before,
                        "ttft_ms": (g.t_first - g.t_submit) * 1e3, "reply": g.output_ids})
        return out

    runs: dict[bool, list[list[dict]]] = {True: [], False: []}
    for r in range(args.repeats):
        for reuse in ((True, False) if r % 2 == 0 else (False, True)):
            runs[reuse].append(conversation(reuse))
    load_avg = os.getloadavg()
    rows = []
    for t in range(args.turns):
        on = [run[t] for run in runs[True]]
        off = [run[t] for run in runs[False]]
        row = {"turn": t + 1, "prompt_tokens": on[0]["prompt_tokens"], "reused_tokens": on[0]["reused"],
               "ttft_ms_reuse": min(x["ttft_ms"] for x in on), "ttft_ms_no_reuse": min(x["ttft_ms"] for x in off),
               "ttft_ms_reuse_range": [min(x["ttft_ms"] for x in on), max(x["ttft_ms"] for x in on)],
               "ttft_ms_no_reuse_range": [min(x["ttft_ms"] for x in off), max(x["ttft_ms"] for x in off)],
               "same_reply": all(x["reply"] == off[0]["reply"] for x in on + off)}
        rows.append(row)
        print(f"turn {row['turn']}: {row['prompt_tokens']:4d} prompt tokens ({row['reused_tokens']:4d} reused)  "
              f"TTFT {row['ttft_ms_reuse']:7.1f} ms with reuse, {row['ttft_ms_no_reuse']:7.1f} ms without "
              f"({row['ttft_ms_no_reuse'] / row['ttft_ms_reuse']:.1f}x)  same reply: {row['same_reply']}")
    total_on = sum(r["ttft_ms_reuse"] for r in rows)
    total_off = sum(r["ttft_ms_no_reuse"] for r in rows)
    print(f"5 turns: TTFT total {total_on:.0f} ms with reuse, {total_off:.0f} ms without; {args.threads} threads; "
          f"load average {load_avg[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "threads": args.threads, "load_average": load_avg},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
