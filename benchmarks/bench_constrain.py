"""What constrained decoding costs: the grammar's mask per token, and decode speed with and without it.

    python benchmarks/bench_constrain.py --model DIR           # an HF model directory (its real vocabulary)
    python benchmarks/bench_constrain.py                       # a tiny random model (small vocabulary)

Per batch size (--batch, default 1 and 8), interleaved rounds, best of --repeats (shared CPUs are noisy):
  - constrained: B requests under a JSON Schema (a person record), sampled at temperature 0.7 with a seed per
    row; decode tokens/s from the engine's own counters (a request ends when its JSON is complete);
  - free: the same B requests without the grammar, each made to generate exactly as many tokens as its JSON
    took (EOS ignored), so both runs have the same batch shape and contexts step by step;
  - mask: each constrained generation's tokens replayed through fresh matchers, timing
    constrain.allowed_tokens for the whole batch (llguidance's fill of every row + the unpack to a bool
    tensor), i.e. what the engine adds per decode step; reported per step and per row.
The JSON each constrained request produced is checked against the schema (jsonschema).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.inference.tiny for the default model

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
    "tags": {"type": "array", "items": {"enum": ["admin", "dev", "ops", "guest"]}, "maxItems": 3},
    "active": {"type": "boolean"}}, "required": ["name", "age", "email", "tags", "active"]}


def decode_rate(engine, prompts, params) -> tuple[float, list[list[int]]]:
    s = engine.stats
    s.decode_tokens, s.decode_seconds = 0, 0.0
    out = engine.generate(prompts, params)
    return s.decode_tokens / s.decode_seconds, out


def mask_cost(vocab, grammar, outputs, vocab_size) -> tuple[float, int]:
    """Seconds of allowed_tokens per decode step over the batch, replaying `outputs` step by step."""
    from lmforge.inference.constrain import allowed_tokens

    cons = [grammar.start() for _ in outputs]
    total, steps = 0.0, 0
    for t in range(max(len(o) for o in outputs)):
        live = [(c, o[t]) for c, o in zip(cons, outputs) if t < len(o)]
        t0 = time.perf_counter()
        allowed_tokens([c for c, _ in live], vocab_size)
        total += time.perf_counter() - t0
        steps += 1
        for c, tok in live:
            c.advance(tok)
    return total / steps, steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="HF model directory (default: a tiny random model)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="write the figures here too")
    args = ap.parse_args()

    import jsonschema
    import torch

    from lmforge.inference.constrain import Vocabulary
    from lmforge.inference.engine import Engine
    from lmforge.inference.generate import chat_ids
    from lmforge.inference.load import load
    from lmforge.inference.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    if args.model:
        lm = load(args.model)
    else:
        from tests.inference.tiny import make_model_dir

        lm = load(make_model_dir(Path(tempfile.mkdtemp()) / "tiny", max_seq_len=1024))
    V = lm.model.cfg.vocab_size
    t0 = time.perf_counter()
    vocab = Vocabulary(lm.tokenizer, V, lm.eos_ids)
    t_vocab = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = vocab.json_schema(SCHEMA)
    t_grammar = time.perf_counter() - t0
    ids = chat_ids(lm.tokenizer, [{"role": "user", "content": "Describe one user of our system as JSON."}])
    print(f"model {args.model or 'tiny random'}: vocab {V}, prompt {len(ids)} tokens, threads {args.threads}; "
          f"vocabulary build {t_vocab * 1000:.0f} ms, schema compile {t_grammar * 1000:.1f} ms; "
          f"load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    rows = []
    for B in args.batch:
        engine = Engine(lm.model, max_batch=B, eos_ids=lm.eos_ids, max_len=len(ids) + 264)
        free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        held = free.replace(ignore_eos=False, grammar=grammar, max_tokens=256)  # ends with its JSON
        engine.generate([ids], free)  # warm up
        best_free = best_con = 0.0
        outs = None
        for _ in range(args.repeats):
            # each row its own seed: B different JSON records, as a real batch would hold
            params = [held.replace(temperature=0.7, seed=s) for s in range(B)]
            r, outs = decode_rate(engine, [ids] * B, params)
            best_con = max(best_con, r)
            # the same rows unconstrained, each as many tokens as its JSON took: same batch shape, same contexts
            r, _ = decode_rate(engine, [ids] * B, [free.replace(temperature=0.7, seed=s, max_tokens=len(o))
                                                   for s, o in enumerate(outs)])
            best_free = max(best_free, r)
        for o in outs:
            jsonschema.validate(json.loads(lm.tokenizer.decode(o)), SCHEMA)
        mask_s, steps = min(mask_cost(vocab, grammar, outs, V) for _ in range(args.repeats))
        row = {"batch": B, "free_tok_s": best_free, "constrained_tok_s": best_con,
               "slowdown_pct": 100 * (1 - best_con / best_free), "mask_us_per_step": mask_s * 1e6,
               "mask_us_per_row": mask_s * 1e6 / B, "tokens_per_json": sum(map(len, outs)) / B,
               "step_ms_free": 1000 * B / best_free}
        rows.append(row)
        print(f"batch {B}: free {best_free:.1f} tok/s, constrained {best_con:.1f} tok/s "
              f"({row['slowdown_pct']:+.1f}% slower); mask {row['mask_us_per_step']:.0f} us per step "
              f"({row['mask_us_per_row']:.0f} us per row) vs a {row['step_ms_free']:.1f} ms free step; "
              f"{row['tokens_per_json']:.0f} tokens per JSON")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "vocab": V, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
