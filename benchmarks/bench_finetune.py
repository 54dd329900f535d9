"""Finetuning speed and memory, side by side in one run (not part of pass/fail).

1. LoRA against full finetuning: lmforge's SFT recipe on the same model, data, shapes and threads;
   tokens/s and peak memory of each.
2. lmforge SFT against a plain transformers training loop (AutoModelForCausalLM from the same HF directory, the same
   batches from the same loader, AdamW, masked cross-entropy, the same precision and thread count), full and LoRA
   (PEFT on the transformers side), as a ratio.

Every variant runs in its own process (peak memory is a per-process high-water mark): the lmforge variants run the
real recipe (`lmforge.finetune.sft.run`, its tokens/s counts step time only, as its log does); the transformers
variants time the same number of steps after the same warmup. Data: the built-in SFT set (stdlib questions).

    python benchmarks/bench_finetune.py                          # tiny preset, fresh random base, 2 threads
    python benchmarks/bench_finetune.py --preset small --steps 20 --threads 2 --dtype bf16
    python benchmarks/bench_finetune.py --base runs/first/final
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ("lmforge-full", "lmforge-lora", "hf-full", "hf-lora")


def make_base(out: Path, preset: str, seed: int = 0) -> Path:
    """A random model of `preset` with a BPE tokenizer trained on a slice of the built-in corpus."""
    import torch

    from lmforge import checkpoint
    from lmforge.data.corpus import builtin_files, read_documents
    from lmforge.model.config import preset as get_preset
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import train_bpe

    texts = [t for _, t in read_documents(builtin_files(2_000_000))]
    tok = train_bpe(iter(texts), 4096)
    cfg = get_preset(preset).replace(vocab_size=tok.vocab_size)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed)
    checkpoint.save_model(model, out, tokenizer=tok)
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_lmforge(args) -> dict:
    import peft  # noqa: F401  (imported only so both workers carry the same library footprint in their RSS)
    import transformers  # noqa: F401

    from lmforge.config import parse_config
    from lmforge.finetune import sft

    out = Path(args.scratch) / args.variant
    argv = ["--base", args.base, "--data", "builtin", "--out", str(out), "--max-steps", str(args.warmup + args.steps),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--eval-every", "0",
            "--heldout-mc", "0", "--val-max", "1", "--train.samples", "0", "--train.threads", str(args.threads),
            "--train.dtype", args.dtype, "--train.peak-flops", "1e12", "--train.log-every", "1",
            "--train.warmup-steps", "2"]
    if args.variant == "lmforge-lora":
        argv += ["--lora", "--lora.rank", str(args.rank), "--lora.dropout", str(args.lora_dropout),
                 "--no-lora.merge"]
    cfg = parse_config(sft.SFTConfig, argv)
    sft.run(cfg)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "seconds" in r]
    # step time only, after the warmup steps (the same window the transformers loop times)
    t0 = next(r for r in timed if r["step"] == args.warmup)
    t1 = timed[-1]
    tps = (t1["tokens"] - t0["tokens"]) / (t1["seconds"] - t0["seconds"])
    summary = json.loads((out / "summary.json").read_text())
    return {"tokens_per_s": tps, "peak_rss_mb": peak_rss_mb(),
            "trainable": summary["model"]["trainable_parameters"], "steps": args.steps}


def worker_hf(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from lmforge import checkpoint
    from lmforge.data import builtin_sets
    from lmforge.data.sft import ExampleLoader, collate, load_sft

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = checkpoint.load_tokenizer(args.base)
    recs = [(str(i), r) for i, r in enumerate(builtin_sets.sft_records("train"))]
    examples, _ = load_sft("builtin", tok, args.seq_len, records=recs)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    if args.variant == "hf-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.lora_dropout,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95), foreach=True)
    loader = ExampleLoader([len(e) for e in examples], args.seq_len, args.batch_size, False, 1337)
    pad = tok.pad_id or 0
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16" else torch.autocast("cpu", enabled=False)
    tokens, t_start = 0, None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            t_start, tokens = time.perf_counter(), 0
        b = collate(examples, loader.next_rows(), pad)
        attn = torch.ones_like(b["input_ids"])  # right padding under a causal mask: pads are never attended
        with amp:
            logits = model(input_ids=b["input_ids"], attention_mask=attn).logits
        n = int(b["loss_mask"].sum())
        loss = F.cross_entropy(logits.float().flatten(0, 1), b["targets"].flatten(), ignore_index=-100,
                               reduction="sum") / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += b["input_ids"].numel()
    dt = time.perf_counter() - t_start
    return {"tokens_per_s": tokens / dt, "peak_rss_mb": peak_rss_mb(),
            "trainable": sum(p.numel() for p in params), "steps": args.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="", help="model directory (default: a fresh random --preset model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=12, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeat", type=int, default=2, help="runs per variant, interleaved; best tokens/s is kept")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()

    if args.worker:
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):  # the recipe prints its output path; keep stdout for JSON
            res = worker_lmforge(args) if args.worker == "lmforge" else worker_hf(args)
        print(json.dumps(res))
        return

    with tempfile.TemporaryDirectory() as scratch:
        base = args.base or str(make_base(Path(scratch) / "base", args.preset))
        # Large tensors always come from mmap and go back to the OS when freed, so a process's peak RSS follows
        # its live tensors instead of glibc's dynamic-threshold heap high-water mark.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        runs: dict[str, list[dict]] = {}
        for r in range(args.repeat):  # interleaved, so a noisy neighbour does not land on one variant only
            for v in args.variants.split(","):
                cmd = [sys.executable, __file__, "--worker", v.split("-")[0], "--variant", v,
                       "--scratch", f"{scratch}/r{r}", "--base", base, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seq-len",
                       str(args.seq_len), "--rank", str(args.rank), "--threads", str(args.threads),
                       "--dtype", args.dtype, "--lora-dropout", str(args.lora_dropout)]
                print(f"running {v} ({r + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if p.returncode:
                    print(p.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{v} failed")
                runs.setdefault(v, []).append(json.loads(p.stdout.strip().splitlines()[-1]))
        results = {v: dict(rs[0], tokens_per_s=max(x["tokens_per_s"] for x in rs),
                           peak_rss_mb=min(x["peak_rss_mb"] for x in rs)) for v, rs in runs.items()}

    import torch

    print(f"\nfinetuning benchmark: base {args.base or 'random ' + args.preset}, builtin SFT data, batch "
          f"{args.batch_size}, seq_len<={args.seq_len}, {args.threads} threads, {args.dtype}, torch "
          f"{torch.__version__}, {args.steps} timed steps after {args.warmup}, best of {args.repeat}\n")
    print("| variant | trainable params | tokens/s | peak RSS (MB) |")
    print("|---|---:|---:|---:|")
    for v, r in results.items():
        print(f"| {v} | {r['trainable']:,} | {r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} |")
    print()

    def ratio(a: str, b: str, key: str) -> str:
        if a in results and b in results:
            return f"{results[a][key] / results[b][key]:.2f}x"
        return "n/a"

    print(f"LoRA / full (lmforge): tokens/s {ratio('lmforge-lora', 'lmforge-full', 'tokens_per_s')}, "
          f"peak memory {ratio('lmforge-lora', 'lmforge-full', 'peak_rss_mb')}")
    print(f"lmforge / transformers, full: tokens/s {ratio('lmforge-full', 'hf-full', 'tokens_per_s')}, "
          f"peak memory {ratio('lmforge-full', 'hf-full', 'peak_rss_mb')}")
    print(f"lmforge / transformers+PEFT, LoRA: tokens/s {ratio('lmforge-lora', 'hf-lora', 'tokens_per_s')}, "
          f"peak memory {ratio('lmforge-lora', 'hf-lora', 'peak_rss_mb')}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
