"""What weight-only int8 costs in quality: perplexity of the same model in fp32, bf16 and int8 on the same text.

    python benchmarks/eval_quantize.py --model runs/pretrain/final --text held_out.txt
    python benchmarks/eval_quantize.py --train-tiny          # pretrains a tiny model here first (a few minutes)

Perplexity is exp(mean NLL) over sliding windows (lmforge.eval.perplexity.sliding_nll, window = the model's
context, stride half of it). int8 is lmforge.model.quantize (per-output-channel symmetric, bf16 activations in
the decode kernel). The change is reported against fp32, as a percentage of perplexity.
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

        variants = (("fp32", "float32", None, None), ("bf16", "bfloat16", None, None),
                    ("int8", "float32", "int8", None),  # many rows per call: dequantize + bf16 GEMM (prefill path)
                    ("int8-decode-kernel", "float32", "int8", 10**9))  # every row through the fused decode kernel
        default_rows = q._FUSED_MAX_ROWS
        for name, dtype, quant, fused_rows in variants:
            q._FUSED_MAX_ROWS = fused_rows or default_rows
            lm = load(path, dtype=dtype, quantize=quant)
            ids = lm.tokenizer.encode(text)[: args.max_tokens]
            window = lm.model.cfg.max_seq_len
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
