"""What each of lmforge's CPU training kernels buys (model/cpu_kernels.cpp sections 5-8: attention's softmax,
RMSNorm, SwiGLU, RoPE), measured in pairs: one model, one process, and each step run twice in a row, once with
the kernel and once with torch's ops in its place (the order alternating), so that the machine's drift between
steps, which on a shared 2-core machine is larger than a kernel's gain, cancels in each pair's ratio. Reports the
median of the pairs' speed ratios (kernel / torch ops) and their range. Not part of pass/fail.

    python benchmarks/bench_train_kernels.py                          # preset small (27M), seq 256, batch 8
    python benchmarks/bench_train_kernels.py --kernels all --compile  # all four, compiled blocks
    python benchmarks/bench_train_kernels.py --base DIR --lora --seq-len 128   # a real model (SmolLM2), LoRA

Compiled blocks (--compile) use only the softmax kernel (training/compile.py: Inductor fuses the others), so
--compile measures that one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "0")  # as `lmforge pretrain` / `finetune` run (lmforge.huge_pages)

KERNELS = {"softmax": "_softmax_kernel", "rmsnorm": "_norm_kernel", "swiglu": "_swiglu_kernel", "rope": "_rope_kernel"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="softmax,rmsnorm,swiglu,rope",
                    help="each measured on its own, comma-separated; 'all': the four together")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--base", default="", help="a model directory instead of a random --preset model")
    ap.add_argument("--lora", action="store_true", help="LoRA r16 on every projection, frozen base in bf16")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lmforge.checkpoint import load_model
    from lmforge.model import cpu_kernels
    from lmforge.model import transformer as tr
    from lmforge.model.config import preset
    from lmforge.model.lora import DEFAULT_TARGETS, apply_lora, lower_frozen_base
    from lmforge.training.optim import build_optimizer
    from lmforge.training.step import clip_grad_norm, lm_loss_sum, loss_scale

    if not cpu_kernels.available():
        raise SystemExit("lmforge's CPU kernels do not run here (AVX512-VNNI and a C++ compiler needed)")
    groups = [list(KERNELS)] if args.kernels == "all" else [[k] for k in args.kernels.split(",")]
    real = {name: getattr(tr, fn) for name, fn in KERNELS.items()}

    def use(names, on):
        for name in names:
            setattr(tr, KERNELS[name], real[name] if on else (lambda *a: False))

    if args.base:
        model = load_model(args.base)
    else:
        model = tr.Transformer(preset(args.preset).replace(max_seq_len=args.seq_len))
        model.init_weights(0)
    if args.lora:
        apply_lora(model, DEFAULT_TARGETS, rank=16, alpha=32)
        lower_frozen_base(model, torch.bfloat16)
    if args.compile:
        from lmforge.training.compile import compile_blocks

        compile_blocks(model, torch.device("cpu"), print)
    model.train()
    opt = build_optimizer(model, 1e-4, 0.1)
    B, T = args.batch_size, args.seq_len
    data = torch.randint(0, model.cfg.vocab_size, (4, B, T + 1), generator=torch.Generator().manual_seed(0))

    def step(i):
        b = data[i % len(data)]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss_sum(model, b[:, :-1], b[:, 1:]) * loss_scale(B * T)
        loss.backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    what = args.base or f"preset {args.preset}"
    print(f"# {what}{' + LoRA' if args.lora else ''}, {B} x {T} tokens, {args.threads} threads, bf16 autocast, "
          f"{'compiled' if args.compile else 'eager'}, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    print("| kernels | tokens/s with | tokens/s without | speed ratio (median of pairs) | pairs' range |")
    print("|---|---:|---:|---:|---|")
    for names in groups:
        times = {True: [], False: []}
        for i in range(args.pairs + 2):  # the first two pairs warm up (and compile, with --compile)
            for on in ((True, False) if i % 2 else (False, True)):
                use(names, on)
                dt = step(i)
                if i >= 2:
                    times[on].append(dt)
        use(names, True)
        ratios = sorted(off / on for on, off in zip(times[True], times[False]))
        with_, without = (B * T / statistics.median(times[k]) for k in (True, False))
        print(f"| {'+'.join(names)} | {with_:,.0f} | {without:,.0f} | {statistics.median(ratios):.3f}x | "
              f"{ratios[0]:.3f}-{ratios[-1]:.3f} |")
    print(f"# load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
