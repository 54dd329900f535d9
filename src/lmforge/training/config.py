"""TrainConfig: the knobs every training recipe shares (budget, batch, optimizer, schedule, evaluation,
checkpoints, precision, parallelism), with the short flags users type on both `pretrain` and `finetune`:
--max-steps --max-tokens --max-time --batch-size --grad-accum --seq-len --lr --seed --eval-every --save-every
--compile/--no-compile.

A recipe embeds it as its `train` section. The defaults are the built-in pretraining run (`lmforge pretrain
--preset tiny` on 2 CPU cores in about three minutes); a recipe with other needs sets its own defaults with
`opt(default_factory=lambda: TrainConfig(lr=..., ...))`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import opt


@dataclass
class TrainConfig:
    # ---- budget: training stops at the first limit reached; the LR schedule spans steps (or tokens, or time)
    max_steps: int | None = opt(None, "optimizer steps to train for, the LR schedule's length (none: the recipe's "
                                      "default budget; pretrain: 500 steps)", flag="--max-steps")
    max_tokens: int | None = opt(None, "stop after this many training tokens (the schedule spans the first limit)",
                                 flag="--max-tokens")
    max_time: float | None = opt(None, "stop after this many seconds of training (the schedule follows time only "
                                       "when neither steps nor tokens are given)", flag="--max-time")
    # ---- batch: tokens per optimizer step = batch_size * grad_accum * seq_len * data-parallel ranks
    batch_size: int = opt(8, "sequences per micro-batch on each device", flag="--batch-size")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", flag="--grad-accum")
    seq_len: int = opt(256, "tokens per training sequence (at most the model's max_seq_len)", flag="--seq-len")
    # ---- optimizer and schedule
    lr: float = opt(3e-3, "peak learning rate", flag="--lr")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr")
    warmup_steps: int = opt(30, "linear warmup steps")
    schedule: str = opt("cosine", "learning-rate decay after warmup", choices=["cosine", "wsd", "constant"])
    decay_fraction: float = opt(0.2, "wsd: fraction of training spent decaying")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: no clipping)")
    seed: int = opt(1337, "seed for every RNG (weights, data order, sampling)", flag="--seed")
    # ---- evaluation, logging, checkpoints
    eval_every: int = opt(100, "steps between validation evaluations (0: only at the end)", flag="--eval-every")
    eval_tokens: int = opt(32768, "validation tokens per evaluation")
    log_every: int = opt(10, "steps between metrics lines")
    samples: int = opt(2, "sample generations at each evaluation")
    sample_tokens: int = opt(64, "tokens per sample generation")
    save_every: int = opt(200, "steps between checkpoints (0: only the final one)", flag="--save-every")
    keep_last: int = opt(2, "step checkpoints to keep (older ones are deleted)")
    resume: bool = opt(True, "continue from the newest valid checkpoint in --out if there is one", flag="--resume")
    # ---- hardware
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: str = opt("auto", "compute precision: auto (bf16 autocast where the hardware has bf16, else fp32)",
                     choices=["auto", "bf16", "fp32"])
    compile: bool | None = opt(None, "torch.compile each transformer block (default: when the step budget passes the "
                                     "measured break-even, training/compile.py; --no-compile: never; CPU needs a "
                                     "C++ compiler)", flag="--compile")
    activation_checkpointing: bool = opt(False, "recompute layer activations in backward to save memory")
    fused_loss: bool = opt(True, "chunked cross-entropy that never holds the whole batch's logits")
    parallel: str = opt("ddp", "data parallelism under torchrun: ddp, or fsdp (FSDP2 fully_shard)",
                        choices=["ddp", "fsdp"])
    threads: int | None = opt(None, "CPU threads for torch (default: 1 or all cores, whichever measures faster at start)")
    peak_flops: float | None = opt(None, "peak FLOP/s of one device for MFU (default: measured at start)")
    tensorboard: bool = opt(False, "also write TensorBoard logs (needs the tensorboard package)")
