"""What weight-only int8 and int4 cost in quality: perplexity of the same model in fp32, bf16, int8 and int4
(at several group sizes) on the same text.

    python benchmarks/eval_quantize.py --model smollm2-135m-instruct      # the real SmolLM2-135M-Instruct
    python benchmarks/eval_quantize.py --model runs/pretrain/final --text held_out.txt
    python benchmarks/eval_quantize.py --train-tiny          # pretrains a tiny model here first (a few minutes)

Perplexity is exp(mean NLL) over sliding windows (lmforge.eval.perplexity.sliding_nll, window = --window or the
model's context, stride half of it). int8 and int4 are lmforge.model.quantize (int8: per-output-channel
symmetric; int4: groups of g input columns, min/max each), loaded as `lmforge generate --quantize` loads them
(fused projections, the head quantized too). A window scores many rows per matmul, which takes the dequantize +
bf16 GEMM path; the "-decode-kernel" rows push every row through the kernels decode uses (bf16 activations, but
int4 in lmforge's q4 packing, whose kernel rounds them to int8 per block of 32 as llama.cpp does).
The change is reported against fp32, as a percentage of perplexity.
A random-weight model says nothing here (its perplexity is ~vocab size whatever the rounding): use a trained one.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train_tiny(root: Path, max_time: float) -> Path:
    """`lmforge prepare` + `lmforge pretrain --preset tiny` on the built-in corpus, time-bounded."""
    lm = [sys.executable, "-m", "lmforge.cli"]
    subprocess.run(lm + ["prepare", "--out", str(root / "data"), "--builtin-bytes", "3000000"], check=True)
    subprocess.run(lm + ["pretrain", "--preset", "tiny", "--data", str(root / "data"), "--out", str(root / "run"),
                         "--max-time", str(max_time), "--max-steps", "100000", "--eval-every", "1000000"], check=True)
    return root / "run" / "final"


def default_text() -> str:
    """Held-out-ish text: standard library modules of one package (email), which a model may or may not have seen."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py")))
    return "\n".join(open(f, encoding="utf-8", errors="replace").read() for f in files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="trained model directory")
    ap.add_argument("--train-tiny", action="store_true", help="pretrain a tiny model first and evaluate it")
    ap.add_argument("--train-seconds", type=float, default=240.0)
    ap.add_argument("--text", help="text file to score (default: the stdlib email package)")
    ap.add_argument("--max-tokens", type=int, default=40_000, help="score at most this many tokens")
    ap.add_argument("--window", type=int, default=0, help="scoring window (0: the model's context, up to 2048)")
    ap.add_argument("--int4-groups", default="32,64,128", help="int4 group sizes to score")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import torch

    from lmforge.eval.perplexity import sliding_nll
    from lmforge.inference.load import load

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            path = Path(args.model)
        elif args.train_tiny:
            path = train_tiny(Path(tmp), args.train_seconds)
        else:
            ap.error("give --model DIR or --train-tiny")
        text = Path(args.text).read_text(encoding="utf-8", errors="replace") if args.text else default_text()
        rows = []
        ref = None
        from lmforge.model import quantize as q

        torch.set_num_threads(args.threads)
        variants = [("fp32", "float32", None, None, 0), ("bf16", "bfloat16", None, None, 0),
                    ("int8", "float32", "int8", None, 0),  # many rows per call: dequantize + bf16 GEMM (prefill path)
                    ("int8-decode-kernel", "float32", "int8", 10**9, 0)]  # every row through the decode kernel
        for g in [int(x) for x in args.int4_groups.split(",") if x]:
            variants += [(f"int4-g{g}", "float32", "int4", None, g),
                         (f"int4-g{g}-decode-kernel", "float32", "int4", 10**9, g)]
        defaults = q._FUSED_MAX_ROWS, q._INT4_FUSED_MAX_ROWS, q.Q4_MAX_ROWS, q.INT4_GROUP_SIZE
        for name, dtype, quant, fused_rows, group in variants:
            # every decode kernel (int8; int4 in torch's and in lmforge's packing) takes every row, or its default
            q._FUSED_MAX_ROWS, q._INT4_FUSED_MAX_ROWS, q.Q4_MAX_ROWS = (
                (fused_rows,) * 3 if fused_rows else defaults[:3])
            q.INT4_GROUP_SIZE = group or defaults[3]
            lm = load(path, dtype=dtype, quantize=quant)
            ids = lm.tokenizer.encode(text)[: args.max_tokens]
            window = args.window or min(lm.model.cfg.max_seq_len, 2048)
            t = time.perf_counter()
            with torch.inference_mode():
                nll, n = sliding_nll(lm.model, ids, window=window, stride=window // 2)
            ppl = math.exp(nll / n)
            ref = ref or ppl
            rows.append({"variant": name, "perplexity": ppl, "tokens": n, "change_vs_fp32": ppl / ref - 1,
                         "seconds": time.perf_counter() - t})
            print(f"{name:18s} perplexity {ppl:9.4f}  ({ppl / ref - 1:+.3%} vs fp32) over {n} tokens, "
                  f"window {window}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"model": str(path), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
