"""`lmforge finetune cpt`: continued pretraining — next-token training of an existing model on a new domain's raw
text, prepared as token shards with the model's own tokenizer.

    lmforge prepare --corpus my-domain/ --tokenizer runs/first/final --out data/my-domain
    lmforge finetune cpt --base runs/first/final --data data/my-domain --out runs/domain [--lora]

Stage 1's loop from a base checkpoint, built from the same training/ primitives (data/shards.TokenLoader windows,
the accumulation-normalised fused loss, AdamW groups, warmup + cosine, the evaluator, metrics, the report): the
weights start from --base instead of a fresh initialisation, the learning rate is re-warmed to a smaller peak than
pretraining's (continual-pretraining practice: re-warm, then decay), and the report compares the domain's
validation loss before and after. The data's tokenizer must be the base's; a mismatch is an error that says how
to re-prepare the data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import opt
from lmforge.errors import LmforgeError
from lmforge.finetune import runs
from lmforge.finetune.weights import LoraOptions, load_base, save_final
from lmforge.training import rundir
from lmforge.training.budget import Budget
from lmforge.training.config import TrainConfig


@dataclass
class CPTTrain(TrainConfig):
    """TrainConfig with continued-pretraining defaults."""

    max_steps: int | None = opt(200, "optimizer steps to train for", flag="--max-steps")
    lr: float = opt(5e-4, "peak learning rate (re-warmed; below the pretraining peak)", flag="--lr")
    warmup_steps: int = opt(20, "linear warmup steps")
    eval_every: int = opt(50, "steps between validation evaluations (0: only before and after)", flag="--eval-every")
    save_every: int = opt(100, "steps between checkpoints (0: only the final one)", flag="--save-every")
    samples: int = opt(0, "sample generations in the report")


@dataclass
class CPTConfig:
    base: str = opt("", "model to continue training (a Hugging Face model directory, e.g. runs/first/final)")
    data: str = opt("", "prepared data directory (lmforge prepare --tokenizer BASE ...)")
    out: str = opt("runs/cpt", "run directory")
    chat_template: str = opt("", "Jinja chat template to save with the result (default: the base tokenizer's)")
    lora: LoraOptions = opt(default_factory=LoraOptions)
    train: CPTTrain = opt(default_factory=CPTTrain)


def check_tokenizer(base_tok: Any, data_dir: Path) -> None:
    """The shards must hold ids of the base's own tokenizer."""
    from lmforge.tokenizer import Tokenizer

    data_tok = Tokenizer.load(data_dir / "tokenizer")
    if data_tok.backend.get_vocab(with_added_tokens=True) != base_tok.backend.get_vocab(with_added_tokens=True):
        raise LmforgeError(f"{data_dir} was tokenized with a different tokenizer than the base model's; prepare it "
                           f"with the base's tokenizer: lmforge prepare --corpus ... --tokenizer BASE_DIR --out {data_dir}")


def run(cfg: CPTConfig) -> int:

    from lmforge.data.shards import TokenLoader, TokenShards, validation_batches
    from lmforge.model.accounting import flops_per_token_train
    from lmforge.training import precision
    from lmforge.training.compile import eager, maybe_compile
    from lmforge.training.evaluate import evaluate
    from lmforge.training.metrics import MetricsWriter, ProgressBar, plot_loss
    from lmforge.training.monitor import Throughput, peak_flops
    from lmforge.training.optim import build_optimizer
    from lmforge.training.report import write_summary
    from lmforge.training.schedule import lr_at, set_lr
    from lmforge.training.state import restore
    from lmforge.training.step import clip_grad_norm, count_targets, lm_loss_sum, loss_scale
    from lmforge.training.stop import StopRequest

    t = cfg.train
    if not cfg.data:
        raise LmforgeError("give the prepared data: --data data/my-domain (make it with lmforge prepare --corpus "
                           "FILES --tokenizer BASE_DIR --out data/my-domain)")
    for name in ("batch_size", "grad_accum", "seq_len"):
        if getattr(t, name) < 1:
            raise LmforgeError(f"--train.{name} must be at least 1")
    train_data, val_data = TokenShards(cfg.data, "train"), TokenShards(cfg.data, "val")  # bad data: error first
    opened = runs.open_run(cfg, cfg.lora.enabled)
    if opened is None:
        return 0
    rt, run_dir, kind, resumed = opened

    amp = precision.resolve_dtype(t.dtype, rt.device)
    base = load_base(cfg.base, cfg.lora, t.seed, rt.device, cfg.chat_template,
                     resumed=resumed if cfg.lora.enabled else None, frozen_dtype=amp)
    model, tok = base.model, base.tokenizer
    check_tokenizer(tok, Path(cfg.data))
    if t.seq_len > model.cfg.max_seq_len:
        raise LmforgeError(f"--seq-len {t.seq_len} is longer than the model's context ({model.cfg.max_seq_len})")
    runs.log(f"model: {base.path} ({'LoRA' if base.lora else 'full'}): {base.trainable:,} trainable of "
             f"{base.total:,} parameters; data: {len(train_data):,} train tokens in {cfg.data}")

    def autocast_ctx():
        return precision.autocast(rt.device, amp)

    model.activation_checkpointing = t.activation_checkpointing
    loader = TokenLoader(train_data, t.seq_len, t.batch_size, t.seed)
    tokens_per_step = t.batch_size * t.grad_accum * t.seq_len
    budget = Budget.resolve(t, tokens_per_step=tokens_per_step)
    maybe_compile(model, t.compile, rt.device, budget.horizon, t.max_time, runs.log)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2))

    def validate() -> dict:
        with eager():  # evaluation's shapes are not training's: no compiling for them
            return evaluate(model, validation_batches(val_data, t.seq_len, t.batch_size, t.eval_tokens),
                            autocast_ctx, val_data.tokens_per_byte)

    step, tokens, seconds = 0, 0, 0.0
    if resumed is not None:
        if not base.lora:
            model.load_state_dict(resumed.weights)
        st = resumed.state
        restore(model, optimizer, st)
        loader.load_state_dict(st["loader"])
        step, tokens, seconds, before = st["step"], st["tokens"], st["seconds"], st["before"]
    else:
        before = validate()
        runs.log(f"before training: domain val loss {before['loss']:.4f} (ppl {before['ppl']:.1f})")
    lineage = {"stage": "cpt", "base_model": str(base.path), "base_lineage": base.lineage, "data": str(cfg.data),
               "method": "lora" if base.lora else "full"}

    metrics = MetricsWriter(run_dir, resume_step=step if resumed is not None else None,
                            tensorboard=t.tensorboard)
    peak = peak_flops(rt.device, amp, t.peak_flops)
    flops_tok = flops_per_token_train(model.cfg, t.seq_len) * (2 / 3 if base.lora else 1.0)
    monitor = Throughput(flops_tok, peak)
    bar = ProgressBar(budget.total, budget.unit, start=budget.position(step, tokens, seconds))

    def save(out: Path) -> Path:
        """A checkpoint that resumes this run exactly."""
        st = {"step": step, "tokens": tokens, "seconds": seconds, "loader": loader.state_dict(), "before": before}
        return runs.save_resumable(base, model, optimizer, rt, out, st, lineage)

    def done() -> bool:
        return budget.done(step, tokens, seconds)

    model.train()
    last: dict = {}
    val: dict = before
    with StopRequest(runs.log) as stop:
        while not done() and not stop.requested:
            t0 = time.perf_counter()
            progress = budget.progress(step, tokens, seconds)
            lr = lr_at(step, progress, t.lr, t.warmup_steps, t.schedule, t.min_lr_ratio, t.decay_fraction)
            set_lr(optimizer, lr)
            batches = [loader.next_batch() for _ in range(t.grad_accum)]
            scale = loss_scale(sum(count_targets(y) for _, y in batches))
            step_loss = 0.0
            for x, y in batches:
                x, y = x.to(rt.device), y.to(rt.device)
                with autocast_ctx():
                    loss = lm_loss_sum(model, x, y, fused=t.fused_loss) * scale
                loss.backward()
                step_loss += float(loss.detach())
            grad_norm = clip_grad_norm(model, t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += tokens_per_step
            dt = time.perf_counter() - t0
            seconds += dt
            monitor.add(tokens_per_step, dt)
            record: dict = {}
            if step % t.log_every == 0 or done():
                record = {"step": step, "tokens": tokens, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                          "seconds": seconds, **monitor.rate(), "epoch": loader.epoch}
                last = record
            if (t.eval_every and step % t.eval_every == 0) or done():
                val = validate()
                record = dict(record or {"step": step, "tokens": tokens}, val_loss=val["loss"], val_bpb=val["bpb"])
            if record:
                metrics.write(record)
                line = runs.record_line(record, ("step", "loss", "val_loss", "lr", "tokens_per_s"))
                bar.update(budget.position(step, tokens, seconds), last.get("loss"), last.get("tokens_per_s"),
                           line=line)
            if t.save_every and step % t.save_every == 0 and not done():
                rundir.save_step(run_dir, step, save, t.keep_last, kind)
    bar.close()
    metrics.close()
    if stop.requested:
        return rundir.interrupted(run_dir, step, save, t.keep_last, kind, runs.log)

    lineage.update(steps=step, tokens=tokens, seconds=round(seconds, 1))
    written = save_final(base, model, run_dir, lineage, merge=cfg.lora.merge)
    peak_mem = runs.peak_memory_bytes(rt.device)
    plot = plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"CPT {run_dir.name}")
    summary = {
        "stage": "finetune cpt", "title": f"Continued pretraining: {run_dir.name}", "status": "complete",
        "run_dir": str(run_dir),
        "data": {"directory": str(cfg.data), "train_tokens": len(train_data), "val_tokens": len(val_data),
                 "epochs_seen": loader.epoch},
        "model": runs.model_section(base, cfg.lora),
        "training": {"steps": step, "tokens": tokens, "lr": t.lr, "batch_size": t.batch_size,
                     "grad_accum": t.grad_accum, "seq_len": t.seq_len, "precision": precision.dtype_name(amp)},
        "compute": {"seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9), "train_flops": monitor.flops_total,
                    "peak_memory_mb": peak_mem / 2**20, "device": str(rt.device)},
        "results": {"val_loss_base": before["loss"], "val_loss_finetuned": val["loss"],
                    "val_bpb_base": before.get("bpb"), "val_bpb_finetuned": val.get("bpb")},
        "outputs": written,
        "plots": [plot.name] if plot else [],
        "notes": base.notes,
    }
    write_summary(run_dir, summary)
    runs.log(f"trained {step} steps, {tokens:,} tokens in {seconds:.0f}s; domain val loss {before['loss']:.4f} -> "
             f"{val['loss']:.4f}; peak memory {peak_mem / 2**20:,.0f} MB")
    print(written.get("final") or written.get("adapter"))
    return 0
