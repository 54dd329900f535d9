"""Finetuning speed and memory, side by side in one run (not part of pass/fail): lmforge's SFT and DPO recipes
against the loops users would otherwise write or pick, on the same model, data, batch, precision and threads.

Variants (each runs in its own process, so its peak memory is its own; the variants alternate, --repeat times):
  lmforge-full, lmforge-lora        `lmforge.finetune.sft.run` / `dpo.run` itself, eager (--no-compile)
  lmforge-full-c, lmforge-lora-c    the same, compiled (--compile: what a run past the break-even gets; the
                                    compile cost is reported apart from the steady-state tokens/s)
  hf-full, hf-lora                  a plain transformers loop (AutoModelForCausalLM from the same HF directory, PEFT
                                    for LoRA), lmforge's own batches, AdamW, masked cross-entropy (SFT only)
  trl-full, trl-lora                TRL's SFTTrainer / DPOTrainer (+ PEFT for LoRA) on the same examples
                                    (pre-tokenized for SFT; DPO from the same prompt/chosen/rejected texts), bf16
                                    through the Trainer's autocast, its own batching (--pack: TRL's BFD packing,
                                    padding-free)
LoRA everywhere: rank --rank, alpha 2 x rank, dropout --lora-dropout, every attention and MLP projection.

tokens/s counts the examples' real tokens (padding excluded) over the timed steps, so packed and padded batches
compare fairly; each variant times the same number of optimizer steps after the same warmup. Data: the built-in
SFT set (stdlib questions), or its preference pairs for --task dpo.

    python benchmarks/bench_finetune.py                                # tiny preset, SFT, 2 threads, bf16
    python benchmarks/bench_finetune.py --pack --variants lmforge-lora-c,trl-lora
    python benchmarks/bench_finetune.py --task dpo --variants lmforge-lora,lmforge-lora-c,trl-lora
    python benchmarks/bench_finetune.py --preset small --batch-size 8 --base runs/first/final
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ("lmforge-full", "lmforge-lora", "lmforge-full-c", "lmforge-lora-c", "hf-full", "hf-lora", "trl-full",
            "trl-lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def sft_examples(base: str, seq_len: int) -> list:
    """The built-in SFT training examples as the recipe tokenizes them (same template, same truncation)."""
    from lmforge import checkpoint
    from lmforge.data import builtin_sets
    from lmforge.data.sft import load_sft

    tok = checkpoint.load_tokenizer(base)
    recs = [(f"builtin sft-train {i + 1}", r) for i, r in enumerate(builtin_sets.sft_records("train"))]
    return load_sft("builtin", tok, seq_len, template=tok.chat_template, records=recs)[0]


def preference_pairs(base: str, seq_len: int) -> list:
    from lmforge import checkpoint
    from lmforge.data import builtin_sets
    from lmforge.data.preference import load_preferences

    tok = checkpoint.load_tokenizer(base)
    recs = [(f"builtin pref-train {i + 1}", r) for i, r in enumerate(builtin_sets.preference_records("train"))]
    return load_preferences("builtin", tok, seq_len, template=tok.chat_template, records=recs)[0]


def timed_window(records: list[dict], warmup: int) -> tuple[float, int, float]:
    """(seconds of the steps after `warmup`, their padded tokens, seconds of the warmup steps) from metrics.jsonl."""
    timed = [r for r in records if "seconds" in r]
    t0 = next(r for r in timed if r["step"] == warmup)
    t1 = timed[-1]
    return t1["seconds"] - t0["seconds"], t1["tokens"] - t0["tokens"], t0["seconds"]


def worker_lmforge(args) -> dict:
    import peft  # noqa: F401  (imported so every worker carries the same library footprint in its RSS)
    import transformers  # noqa: F401

    from lmforge.config import parse_config
    from lmforge.data.sft import ExampleLoader

    out = Path(args.scratch) / args.variant
    lora, compiled = "-lora" in args.variant, args.variant.endswith("-c")
    argv = ["--base", args.base, "--data", "builtin", "--out", str(out), "--max-steps", str(args.warmup + args.steps),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--eval-every", "0",
            "--heldout-mc", "0", "--val-max", "1", "--train.samples", "0", "--train.threads", str(args.threads),
            "--train.dtype", args.dtype, "--train.peak-flops", "1e12", "--train.log-every", "1",
            "--train.warmup-steps", "2", "--compile" if compiled else "--no-compile"]
    if lora:
        argv += ["--lora", "--lora.rank", str(args.rank), "--lora.alpha", str(2 * args.rank),
                 "--lora.dropout", str(args.lora_dropout), "--no-lora.merge"]
    if args.task == "sft":
        from lmforge.finetune import sft as recipe

        if args.pack:
            argv.append("--pack")
        cfg = parse_config(recipe.SFTConfig, argv)
        lengths = [len(e) for e in sft_examples(args.base, args.seq_len)]
        real = lengths
        pack = args.pack
    else:
        from lmforge.finetune import dpo as recipe

        cfg = parse_config(recipe.DPOConfig, argv)
        pairs = preference_pairs(args.base, args.seq_len)
        lengths = [max(len(p.chosen), len(p.rejected)) for p in pairs]
        real = [len(p.chosen) + len(p.rejected) for p in pairs]
        pack = False
    recipe.run(cfg)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    seconds, padded, warm_s = timed_window(records, args.warmup)
    # replay the recipe's loader (same lengths, seed, packing) to count the real tokens of the timed steps
    loader = ExampleLoader(lengths, args.seq_len, args.batch_size, pack, cfg.train.seed)
    tokens = 0
    for step in range(args.warmup + args.steps):
        rows = loader.next_rows()
        if step >= args.warmup:
            tokens += sum(real[i] - (1 if args.task == "sft" else 2) for row in rows for i in row)
    summary = json.loads((out / "summary.json").read_text())
    return {"tokens_per_s": tokens / seconds, "padded_tokens_per_s": padded / seconds, "peak_rss_mb": peak_rss_mb(),
            "trainable": summary["model"]["trainable_parameters"], "warmup_s": warm_s,
            "step_s": seconds / args.steps}


def _hf_model(args):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    if args.variant.endswith("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                 lora_dropout=args.lora_dropout, target_modules=TARGETS))
    return model


def worker_hf(args) -> dict:
    import torch
    import torch.nn.functional as F

    from lmforge import checkpoint
    from lmforge.data.sft import ExampleLoader, collate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = checkpoint.load_tokenizer(args.base)
    examples = sft_examples(args.base, args.seq_len)
    model = _hf_model(args).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95), foreach=True)
    loader = ExampleLoader([len(e) for e in examples], args.seq_len, args.batch_size, args.pack, 1337)
    pad = tok.pad_id or 0
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    tokens, t_start = 0, time.perf_counter()
    warm_s = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            warm_s = time.perf_counter() - t_start
            t_start, tokens = time.perf_counter(), 0
        rows = loader.next_rows()
        b = collate(examples, rows, pad)
        kw = {"attention_mask": torch.ones_like(b["input_ids"])}  # right padding under a causal mask
        if b["attn_mask"] is not None:  # packed rows: per-example positions and a block-diagonal 4D mask
            kw = {"attention_mask": b["attn_mask"], "position_ids": b["input_pos"]}
        with amp:
            logits = model(input_ids=b["input_ids"], **kw).logits
        n = int(b["loss_mask"].sum())
        loss = F.cross_entropy(logits.float().flatten(0, 1), b["targets"].flatten(), ignore_index=-100,
                               reduction="sum") / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += sum(len(examples[i]) - 1 for row in rows for i in row)
    dt = time.perf_counter() - t_start
    return {"tokens_per_s": tokens / dt, "peak_rss_mb": peak_rss_mb(), "warmup_s": warm_s,
            "trainable": sum(p.numel() for p in params), "step_s": dt / args.steps}


def worker_trl(args) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_tok = AutoTokenizer.from_pretrained(args.base)
    if hf_tok.pad_token is None:
        hf_tok.pad_token = hf_tok.eos_token
    model = _hf_model(args)
    counted = {"tokens": 0, "steps": 0}
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            times.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter())

    common = dict(output_dir=str(Path(args.scratch) / args.variant), max_steps=args.warmup + args.steps,
                  per_device_train_batch_size=args.batch_size, learning_rate=1e-4, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, bf16=args.dtype == "bf16",
                  dataloader_num_workers=0, seed=1337, max_length=args.seq_len, disable_tqdm=True)
    if args.task == "sft":
        from trl import SFTConfig, SFTTrainer

        examples = sft_examples(args.base, args.seq_len)
        ds = datasets.Dataset.from_list([{"input_ids": e.ids, "assistant_masks": [int(t) for t in e.train]}
                                         for e in examples])
        cfg = SFTConfig(**common, packing=args.pack, padding_free=args.pack, assistant_only_loss=False)

        class Counting(SFTTrainer):
            def compute_loss(self, model, inputs, *a, **kw):
                mask = inputs.get("attention_mask")  # padded rows; padding-free: one flat row of real tokens
                counted["tokens"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
                return super().compute_loss(model, inputs, *a, **kw)

        trainer = Counting(model=model, args=cfg, train_dataset=ds, processing_class=hf_tok, callbacks=[Clock()])
    else:
        from trl import DPOConfig, DPOTrainer

        from lmforge.data import builtin_sets
        from lmforge.data.preference import to_preference

        rows = []
        for r in builtin_sets.preference_records("train"):
            prompt, chosen, rejected = to_preference(r)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        ds = datasets.Dataset.from_list(rows)
        cfg = DPOConfig(**common, beta=0.1, loss_type=["sigmoid"])

        class Counting(DPOTrainer):
            def compute_loss(self, model, inputs, *a, **kw):
                keys = ["attention_mask"] if "attention_mask" in inputs else [
                    k for k in inputs if k.endswith("attention_mask")]
                counted["tokens"] += sum(int(inputs[k].sum()) for k in keys)
                return super().compute_loss(model, inputs, *a, **kw)

        trainer = Counting(model=model, args=cfg, train_dataset=ds, processing_class=hf_tok, callbacks=[Clock()])
    marks: dict[int, int] = {}

    class Mark(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            marks[state.global_step] = counted["tokens"]

    trainer.add_callback(Mark())
    trainer.train()
    begins, ends = times[0::2], times[1::2]
    seconds = ends[-1] - begins[args.warmup]
    tokens = counted["tokens"] - marks[args.warmup]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"tokens_per_s": tokens / seconds, "peak_rss_mb": peak_rss_mb(), "trainable": trainable,
            "warmup_s": begins[args.warmup] - begins[0], "step_s": seconds / args.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sft", choices=["sft", "dpo"])
    ap.add_argument("--base", default="", help="model directory (default: a fresh random --preset model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=12, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiling happens here)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--pack", action="store_true", help="SFT: packed rows (lmforge, hf) / BFD padding-free (TRL)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--variants", default="")
    ap.add_argument("--repeat", type=int, default=2, help="runs per variant, interleaved; the median is kept")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--quiet-busy", type=float, default=0.15, help="before each run, wait until the machine's CPUs "
                                                                    "are less busy than this")
    ap.add_argument("--max-wait", type=float, default=600, help="longest wait for a quiet machine per run (0: none)")
    args = ap.parse_args()

    if args.worker:
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):  # the recipe prints its output path; keep stdout for JSON
            worker = {"lmforge": worker_lmforge, "hf": worker_hf, "trl": worker_trl}[args.worker]
            res = worker(args)
        print(json.dumps(res))
        return

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quiet import Watch, wait_quiet

    default = ("lmforge-full,lmforge-lora,lmforge-full-c,lmforge-lora-c,hf-full,hf-lora,trl-full,trl-lora"
               if args.task == "sft" else "lmforge-lora,lmforge-lora-c,trl-lora")
    variants = [v for v in (args.variants or default).split(",") if v]
    for v in variants:
        if v not in VARIANTS or (args.task == "dpo" and v.startswith("hf-")):
            raise SystemExit(f"unknown variant {v} for --task {args.task}; choose from {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as scratch:
        base = args.base or str(make_base(Path(scratch) / "base", args.preset))
        # The workers run with glibc's default allocator settings, as users' processes do. (An earlier version set
        # MALLOC_MMAP_THRESHOLD_=131072 so that peak RSS followed the live tensors; every large buffer then came
        # from a fresh mmap, faulted and zeroed again each step, which halved every variant's speed: SmolLM2 eager
        # LoRA 1.6 s a step from the command line, 3.3 s in this benchmark.)
        cache = os.path.join(scratch, "cache")  # (LMFORGE_COMPILE_CACHE: the compile cache's own root, where set)
        env = dict(os.environ, LMFORGE_CACHE=cache, LMFORGE_COMPILE_CACHE=cache)
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        runs: dict[str, list[dict]] = {}
        for r in range(args.repeat):  # interleaved, so a noisy neighbour does not land on one variant only
            for v in variants if r % 2 == 0 else variants[::-1]:
                cmd = [sys.executable, __file__, "--worker", v.split("-")[0], "--variant", v, "--task", args.task,
                       "--scratch", f"{scratch}/r{r}", "--base", base, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seq-len",
                       str(args.seq_len), "--rank", str(args.rank), "--threads", str(args.threads),
                       "--dtype", args.dtype, "--lora-dropout", str(args.lora_dropout)] + (["--pack"] * args.pack)
                print(f"running {v} ({r + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
                if args.max_wait > 0:
                    wait_quiet(args.quiet_busy, args.max_wait)
                with Watch() as w:
                    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if p.returncode:
                    print(p.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{v} failed")
                res = json.loads(p.stdout.strip().splitlines()[-1])
                res["others_cpu"] = w.others
                busy = f", others used {w.others:.0%} of the CPUs" if w.others is not None else ""
                print(f"  {v}: {res['tokens_per_s']:,.0f} tokens/s, warmup {res['warmup_s']:.1f}s{busy}",
                      file=sys.stderr)
                runs.setdefault(v, []).append(res)
        results = {v: dict(rs[0], tokens_per_s=statistics.median(x["tokens_per_s"] for x in rs),
                           rounds=[x["tokens_per_s"] for x in rs], warmup_s=statistics.median(x["warmup_s"] for x in rs),
                           peak_rss_mb=min(x["peak_rss_mb"] for x in rs)) for v, rs in runs.items()}

    import torch

    print(f"\nfinetuning benchmark ({args.task}): base {args.base or 'random ' + args.preset}, builtin data, batch "
          f"{args.batch_size}, seq_len<={args.seq_len}{', packed' if args.pack else ''}, {args.threads} threads, "
          f"{args.dtype}, LoRA r{args.rank}, torch {torch.__version__}, {args.steps} timed steps after {args.warmup}, "
          f"median of {args.repeat}\n")
    print("| variant | trainable params | tokens/s (real tokens) | rounds | warmup s (compile) | peak RSS (MB) |")
    print("|---|---:|---:|---|---:|---:|")
    for v, r in results.items():
        print(f"| {v} | {r['trainable']:,} | {r['tokens_per_s']:,.0f} | {', '.join(f'{x:.0f}' for x in r['rounds'])} "
              f"| {r['warmup_s']:.1f} | {r['peak_rss_mb']:,.0f} |")
    print()

    def ratio(a: str, b: str) -> str:
        if a in results and b in results:
            return f"{results[a]['tokens_per_s'] / results[b]['tokens_per_s']:.2f}x"
        return "n/a"

    others = [x["others_cpu"] for rs in runs.values() for x in rs if x.get("others_cpu") is not None]
    if others:
        print(f"other processes used {statistics.median(others):.0%} (median; max {max(others):.0%}) of the CPUs "
              "during the runs\n")
    for a, b in (("lmforge-lora", "lmforge-full"), ("lmforge-lora-c", "lmforge-full-c"),
                 ("lmforge-lora-c", "lmforge-full"), ("lmforge-full", "hf-full"), ("lmforge-lora", "hf-lora"),
                 ("lmforge-lora-c", "hf-lora"), ("lmforge-full-c", "trl-full"), ("lmforge-lora", "trl-lora"),
                 ("lmforge-lora-c", "trl-lora")):
        if a in results and b in results:
            print(f"{a} / {b}: tokens/s {ratio(a, b)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
