"""Training throughput and peak memory: lmforge's training step against a plain transformers
LlamaForCausalLM loop with the same shapes, dtype (bf16 autocast where available) and thread count, side by
side in one run; plus lmforge's MFU against this machine's measured bf16 matmul peak.

    python benchmarks/bench_train.py                       # preset small, seq 256, batch 8, 2 threads
    python benchmarks/bench_train.py --variants lmforge,lmforge-compile,transformers --rounds 3

Each measurement runs in its own child process (so peak memory is that variant's own: ru_maxrss on CPU,
max_memory_allocated on CUDA), and the variants alternate round by round so that a noisy shared machine
slows them alike; the table reports the median tokens/s over rounds and, as the ratio, the median of the
per-round ratios to transformers (each round's pair ran back to back, so the ratio resists load changes better
than the medians do; on a shared 2-core machine 2-thread figures still swing several-fold between rounds, and
--threads 1 is the steadier comparison). Both loops do the same work per step:
forward, summed cross-entropy over every target, backward, gradient clipping to 1.0, AdamW step.

Variants:
  lmforge          lmforge.model.Transformer + lmforge.training (fused chunked cross-entropy, foreach AdamW)
  lmforge-unfused  the same with the plain logits + F.cross_entropy loss (shows what the fused loss buys)
  lmforge-compile  lmforge with torch.compile (compile time excluded, reported separately)
  transformers     LlamaForCausalLM(config) with labels -> HF's own loss, torch AdamW (foreach)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("lmforge", "lmforge-unfused", "lmforge-compile", "transformers")


def _child(args: argparse.Namespace) -> dict:
    """Run one variant in this process: warm up, time `steps` steps, report tokens/s and peak memory."""
    import resource

    import torch

    torch.set_num_threads(args.threads)
    from lmforge.model.accounting import flops_per_token_train
    from lmforge.model.config import preset
    from lmforge.training.optim import build_optimizer
    from lmforge.training.precision import autocast, resolve_dtype
    from lmforge.training.step import clip_grad_norm, lm_loss_sum, loss_scale

    device = torch.device(args.device)
    cfg = preset(args.preset).replace(max_seq_len=max(args.seq_len, 256))
    amp = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (args.steps + args.warmup, args.batch_size, args.seq_len + 1), generator=g)
    variant = args.child
    compile_s = None
    if variant.startswith("lmforge"):
        from lmforge.model.transformer import Transformer

        model = Transformer(cfg)
        model.init_weights(0)
        model.to(device).train()
        optimizer = build_optimizer(model, 1e-4, 0.1)
        fused = variant != "lmforge-unfused"
        head = model.lm_head.weight
        fwd = torch.compile(model) if variant == "lmforge-compile" else model

        def step(batch):
            x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
            with autocast(device, amp):
                loss = lm_loss_sum(fwd, x, y, fused=fused, output_weight=head) * loss_scale(y.numel())
            loss.backward()
            clip_grad_norm(model, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        hf_cfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(hf_cfg).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                      foreach=device.type != "cuda", fused=device.type == "cuda" or None)

        def step(batch):
            x = batch[:, :-1].to(device)  # HF shifts labels itself: T-1 targets per row
            with autocast(device, amp):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t = time.perf_counter()
    for i in range(args.warmup):
        step(data[i])
    sync()
    if variant == "lmforge-compile":
        compile_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        t = time.perf_counter()
        step(data[i])
        sync()
        times.append(time.perf_counter() - t)
    tokens = args.batch_size * args.seq_len
    dt = statistics.median(times)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated()
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "tokens_per_s": tokens / dt, "step_s": dt, "peak_mem_bytes": peak_mem,
            "compile_s": compile_s, "flops_per_token": flops_per_token_train(cfg, args.seq_len)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="lmforge,lmforge-unfused,transformers")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return

    import torch

    from lmforge.training.monitor import measure_peak_flops
    from lmforge.training.precision import dtype_name, resolve_dtype

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = resolve_dtype(args.dtype, device)
    peak = measure_peak_flops(device, amp, seconds=2.0)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v}; choose from {', '.join(VARIANTS)}")
    print(f"# bench_train: preset {args.preset}, seq {args.seq_len}, batch {args.batch_size}, "
          f"{args.threads} threads, {dtype_name(amp)} autocast, {device}; measured {dtype_name(amp)} matmul peak "
          f"{peak / 1e12:.2f} TFLOP/s", flush=True)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    base = [sys.executable, os.path.abspath(__file__)] + [a for a in sys.argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            out = subprocess.run(base + ["--child", v], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"{v} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[v].append(res)
            print(f"round {r + 1} {v:<16} {res['tokens_per_s']:8.0f} tokens/s", file=sys.stderr, flush=True)
    ref = results.get("transformers")
    rows = []
    print("\n| variant | tokens/s (median) | vs transformers (median of round ratios) | peak memory | MFU | compile | rounds |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        per_round = [x["tokens_per_s"] for x in results[v]]
        tps = statistics.median(per_round)
        ratio = statistics.median(a / b["tokens_per_s"] for a, b in zip(per_round, ref)) if ref else None
        mem = max(x["peak_mem_bytes"] for x in results[v])
        mfu = tps * results[v][0]["flops_per_token"] / peak
        comp = results[v][0]["compile_s"]
        print(f"| {v} | {tps:,.0f} | {f'{ratio:.2f}x' if ratio else '—'} | {mem / 2**20:,.0f} MiB | {mfu:.1%} | "
              f"{f'{comp:.0f}s' if comp else '—'} | {', '.join(f'{x:.0f}' for x in per_round)} |")
        rows.append({"variant": v, "tokens_per_s": tps, "ratio_vs_transformers": ratio, "peak_mem_bytes": mem,
                     "mfu": mfu, "compile_s": comp, "rounds": per_round})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "peak_flops": peak, "results": rows}, f, indent=2)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
