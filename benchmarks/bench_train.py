"""Training throughput and peak memory: lmforge's training step against a plain transformers
LlamaForCausalLM loop with the same shapes, dtype (bf16 autocast where available) and thread count, side by
side in one run; plus lmforge's MFU against this machine's measured bf16 matmul peak, and what compiling costs
and buys (cold and warm compile time, the break-even step count, tokens/s over a whole run including compiling).

    python benchmarks/bench_train.py                       # preset small, seq 256, batch 8, 2 threads
    python benchmarks/bench_train.py --variants lmforge,lmforge-compile,transformers --rounds 3
    python benchmarks/bench_train.py --preset tiny --run-steps 600   # the default ./run.sh pretrain shape

Each measurement runs in its own child process (so peak memory is that variant's own: ru_maxrss on CPU,
max_memory_allocated on CUDA), and the variants alternate round by round so that a noisy shared machine
slows them alike; the table reports the median tokens/s over rounds and, as the ratio, the median of the
per-round ratios to transformers (each round's pair ran back to back, so the ratio resists load changes better
than the medians do; on a shared 2-core machine 2-thread figures still swing several-fold between rounds, and
--threads 1 is the steadier comparison). Both loops do the same work per step:
forward, summed cross-entropy over every target, backward, gradient clipping to 1.0, AdamW step.

Variants:
  lmforge          lmforge.model.Transformer + lmforge.training, eager (fused chunked cross-entropy, fused AdamW)
  lmforge-unfused  the same with the plain logits + F.cross_entropy loss (shows what the fused loss buys)
  lmforge-compile  lmforge as `lmforge pretrain` compiles it (training/compile.py: every block, lmforge's
                   persistent cache); each round first compiles with an empty cache (cold), then again in a new
                   process with the cache that run filled (warm: what a second run pays)
  transformers     LlamaForCausalLM(config) with labels -> HF's own loss, torch AdamW (foreach; fused on CUDA)

Compile cost = time of the warmup steps minus warmup x the steady step time. Break-even = compile cost / (eager
step - compiled step). "Whole run" = tokens/s over --run-steps steps including the compile cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("lmforge", "lmforge-unfused", "lmforge-compile", "transformers")
CHILDREN = ("lmforge", "lmforge-unfused", "lmforge-compile-cold", "lmforge-compile", "transformers")


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
    compiled = variant.startswith("lmforge-compile")
    if variant.startswith("lmforge"):
        from lmforge.model.transformer import Transformer
        from lmforge.training.compile import compile_blocks

        model = Transformer(cfg)
        model.init_weights(0)
        model.to(device).train()
        optimizer = build_optimizer(model, 1e-4, 0.1)
        fused = variant != "lmforge-unfused"
        head = model.lm_head.weight
        if compiled and not compile_blocks(model, device, lambda m: print(m, file=sys.stderr)):
            raise SystemExit("no C++ compiler: cannot compile on CPU")

        def step(batch):
            x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
            with autocast(device, amp):
                loss = lm_loss_sum(model, x, y, fused=fused, output_weight=head) * loss_scale(y.numel())
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
    warmup_s = time.perf_counter() - t
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
            "warmup_s": warmup_s, "compile_s": max(0.0, warmup_s - args.warmup * dt) if compiled else None,
            "flops_per_token": flops_per_token_train(cfg, args.seq_len)}


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
    p.add_argument("--variants", default="lmforge,lmforge-compile,transformers")
    p.add_argument("--run-steps", type=int, default=600, help="steps of the whole run the compile cost is spread over")
    p.add_argument("--quiet-busy", type=float, default=0.15, help="before each child, wait until the machine's CPUs "
                                                                   "are less busy than this")
    p.add_argument("--max-wait", type=float, default=600, help="longest wait for a quiet machine per child (0: none)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from quiet import Watch, wait_quiet

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
    children = [c for v in variants for c in (("lmforge-compile-cold", v) if v == "lmforge-compile" else (v,))]
    results: dict[str, list[dict]] = {c: [] for c in children}
    base = [sys.executable, os.path.abspath(__file__)] + [a for a in sys.argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):
            cache = os.path.join(scratch, f"cache-{r}")  # empty for the cold child, then warm for the next
            for c in children if r % 2 == 0 else _reverse_keeping_cold_first(children):
                q = wait_quiet(args.quiet_busy, args.max_wait) if args.max_wait > 0 else {}
                with Watch() as w:
                    out = subprocess.run(base + ["--child", c], capture_output=True, text=True,
                                         env=dict(env, LMFORGE_CACHE=cache, LMFORGE_COMPILE_CACHE=cache))
                if out.returncode != 0:
                    sys.exit(f"{c} failed:\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                res["others_cpu"], res["load1"] = w.others, q.get("load1")
                results[c].append(res)
                comp = f", compile {res['compile_s']:.1f}s" if res["compile_s"] is not None else ""
                busy = f", others used {w.others:.0%} of the CPUs" if w.others is not None else ""
                print(f"round {r + 1} {c:<20} {res['tokens_per_s']:8.0f} tokens/s{comp}{busy}", file=sys.stderr,
                      flush=True)
    ref = results.get("transformers")
    eager = results.get("lmforge")
    rows = []
    tokens = args.batch_size * args.seq_len
    print(f"\n| variant | tokens/s (median) | vs transformers (median of round ratios) | peak memory | MFU | compile "
          f"| tokens/s over a {args.run_steps}-step run, compile included | vs transformers | rounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in children:
        per_round = [x["tokens_per_s"] for x in results[c]]
        tps = statistics.median(per_round)
        ratio = statistics.median(a / b["tokens_per_s"] for a, b in zip(per_round, ref)) if ref else None
        mem = max(x["peak_mem_bytes"] for x in results[c])
        mfu = tps * results[c][0]["flops_per_token"] / peak
        comps = [x["compile_s"] for x in results[c] if x["compile_s"] is not None]
        comp = statistics.median(comps) if comps else None
        whole = args.run_steps * tokens / (args.run_steps * tokens / tps + (comp or 0.0))
        whole_ratio = whole / statistics.median(x["tokens_per_s"] for x in ref) if ref else None
        print(f"| {c} | {tps:,.0f} | {f'{ratio:.2f}x' if ratio else '—'} | {mem / 2**20:,.0f} MiB | {mfu:.1%} | "
              f"{f'{comp:.0f}s' if comp is not None else '—'} | {whole:,.0f} | "
              f"{f'{whole_ratio:.2f}x' if whole_ratio else '—'} | {', '.join(f'{x:.0f}' for x in per_round)} |")
        rows.append({"variant": c, "tokens_per_s": tps, "ratio_vs_transformers": ratio, "peak_mem_bytes": mem,
                     "mfu": mfu, "compile_s": comp, "whole_run_tokens_per_s": whole, "rounds": per_round})
    if eager:
        step_eager = tokens / statistics.median(x["tokens_per_s"] for x in eager)
        for c in ("lmforge-compile-cold", "lmforge-compile"):
            if c in results:
                row = next(x for x in rows if x["variant"] == c)
                gain = step_eager - tokens / row["tokens_per_s"]
                row["break_even_steps"] = row["compile_s"] / gain if gain > 0 else None
                print(f"break-even ({c}): {row['compile_s']:.1f}s compile / {gain * 1000:.0f} ms saved per step = "
                      + (f"{row['break_even_steps']:.0f} steps" if gain > 0 else "never (no per-step gain)"))
    others = [x["others_cpu"] for rs in results.values() for x in rs if x.get("others_cpu") is not None]
    if others:
        print(f"other processes used {statistics.median(others):.0%} (median; max {max(others):.0%}) of the CPUs "
              f"during the timed runs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "peak_flops": peak, "results": rows,
                       "raw": results}, f, indent=2)


def _reverse_keeping_cold_first(children: list[str]) -> list[str]:
    """The reversed order for odd rounds, except that the cold compile still runs before the warm one."""
    order = children[::-1]
    if "lmforge-compile-cold" in order and "lmforge-compile" in order:
        i, j = order.index("lmforge-compile"), order.index("lmforge-compile-cold")
        order[i], order[j] = order[j], order[i]
    return order


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
