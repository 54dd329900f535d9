"""`lmforge finetune sft`: supervised finetuning on chat data, of every weight or of a LoRA adapter.

    lmforge finetune sft --base runs/first/final --data my.jsonl --out runs/sft [--lora --lora.rank 16]
    lmforge finetune sft --base runs/first/final --data builtin            # questions about the Python stdlib

The recipe, top to bottom: load the base (and LoRA), render and tokenize the data with the base's chat template
(data/sft.py: loss only on assistant tokens), score the held-out set once before training, then the loop: a step
is grad_accum micro-batches whose summed token losses are scaled by 1 / (trainable tokens in the whole step)
(training/step.py), backward, clip, AdamW; log, evaluate and checkpoint on their schedules; finally save final/
(and adapter/ for LoRA), score the held-out set again, and write summary.json + report.md with the difference.

The budget (training/budget.py) is the first limit reached among --max-steps, --max-tokens, --max-time, and, when
none is given, --train.epochs passes over the data. The learning-rate schedule spans whichever bounds the run. Runs
resume from their newest loadable checkpoint (training/rundir.py; same config, same seed: the same losses as an
uninterrupted run).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import opt
from lmforge.data.sft import SFT_FORMATS, ExampleLoader, ReadStats, collate, load_sft
from lmforge.data.split import holdout_split
from lmforge.errors import LmforgeError
from lmforge.finetune import runs
from lmforge.finetune.weights import LoraOptions, load_base, save_final
from lmforge.training import rundir
from lmforge.training.budget import Budget
from lmforge.training.config import TrainConfig


@dataclass
class SFTTrain(TrainConfig):
    """TrainConfig with finetuning defaults (small learning rate, few steps, frequent evaluation)."""

    max_steps: int | None = opt(None, "optimizer steps to train for (default: --train.epochs over the data)",
                                flag="--max-steps")
    epochs: float = opt(3.0, "passes over the training examples when no step, token or time limit is given")
    batch_size: int = opt(16, "examples (or packed rows) per micro-batch", flag="--batch-size")
    seq_len: int = opt(512, "longest example in tokens (longer ones are truncated and counted; at most the "
                            "model's context)", flag="--seq-len")
    lr: float = opt(3e-4, "peak learning rate (LoRA usually wants more, e.g. 1e-3)", flag="--lr")
    warmup_steps: int = opt(10, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay (matrices only)")
    eval_every: int = opt(50, "steps between held-out evaluations (0: only before and after)", flag="--eval-every")
    log_every: int = opt(5, "steps between metrics lines")
    save_every: int = opt(0, "steps between checkpoints (0: only the final one)", flag="--save-every")


@dataclass
class SFTConfig:
    base: str = opt("", "base model directory (Hugging Face format, e.g. runs/first/final)")
    data: str = opt("builtin", "JSONL file or directory of them, or 'builtin' (questions about the Python "
                               "standard library, generated at run time)")
    out: str = opt("runs/sft", "run directory")
    format: str = opt("auto", "record shape (auto: detected per line)", choices=list(SFT_FORMATS))
    val_data: str = opt("", "held-out JSONL for validation loss (default: --val-fraction of --data; builtin: its "
                            "held-out split)")
    val_fraction: float = opt(0.05, "share of --data held out for validation when --val-data is not given")
    train_on_all: bool = opt(False, "train on every token, prompts included (default: assistant tokens only)")
    skip_bad: bool = opt(False, "skip malformed lines (counted in the log) instead of stopping at the first")
    pack: bool = opt(False, "pack short examples into rows (per-example positions and attention masks)")
    chat_template: str = opt("", "Jinja file to render conversations with (default: the base tokenizer's "
                                 "template, else ChatML)")
    val_max: int = opt(256, "validation examples scored at each evaluation (the first N of the held-out set)")
    heldout_mc: int = opt(100, "builtin: held-out multiple-choice questions scored before and after (0: none)")
    lora: LoraOptions = opt(default_factory=LoraOptions)
    train: SFTTrain = opt(default_factory=SFTTrain)


# ---- data ----------------------------------------------------------------------------------------------------
def load_data(cfg: SFTConfig, tokenizer: Any, template: str, seq_len: int, run_dir: Path) -> dict:
    """Train/validation examples, read statistics, and (builtin) the held-out multiple-choice items."""
    mc_items: list[dict] = []
    if cfg.data == "builtin":
        from lmforge.data import builtin_sets

        files = builtin_sets.write_builtin_sets(run_dir / "data")
        train_recs = [(f"builtin sft-train {i + 1}", r) for i, r in enumerate(builtin_sets.sft_records("train"))]
        val_recs = [(f"builtin heldout {i + 1}", r)
                    for i, r in enumerate(builtin_sets.sft_records("heldout")[:cfg.val_max])]
        train, stats = load_sft("builtin", tokenizer, seq_len, template=template, records=train_recs,
                                train_on_all=cfg.train_on_all)
        val, _ = load_sft("builtin", tokenizer, seq_len, template=template, records=val_recs)
        mc_items = builtin_sets.heldout_mc()[:cfg.heldout_mc] if cfg.heldout_mc > 0 else []
        source = f"builtin (stdlib questions; files in {files['sft-train'].parent})"
    else:
        examples, stats = load_sft(cfg.data, tokenizer, seq_len, cfg.format, train_on_all=cfg.train_on_all,
                                   skip_bad=cfg.skip_bad, template=template)
        if cfg.val_data:
            train = examples
            val, _ = load_sft(cfg.val_data, tokenizer, seq_len, cfg.format, skip_bad=cfg.skip_bad, template=template)
        else:
            train, val = holdout_split(examples, cfg.val_fraction, cfg.train.seed)
        source = cfg.data
    return {"train": train, "val": val[:cfg.val_max], "stats": stats, "mc_items": mc_items, "source": source}


def _stats_line(stats: ReadStats, n_train: int, n_val: int) -> str:
    s = (f"data: {stats.records} records -> {n_train} train / {n_val} validation examples, "
         f"{stats.train_tokens:,} trainable of {stats.tokens:,} tokens; truncated {stats.truncated}, "
         f"dropped (nothing left to train on) {stats.dropped_empty}")
    if stats.skipped_bad:
        s += f", skipped malformed {stats.skipped_bad} (e.g. {stats.bad_examples[0]})"
    return s


# ---- evaluation -------------------------------------------------------------------------------------------
def evaluate(model: Any, tokenizer: Any, val: list, mc_items: list[dict], render: Any, autocast_ctx: Any,
             mc_examples: list | None = None) -> dict:
    from lmforge.finetune.heldout import masked_loss, mc_accuracy
    from lmforge.training.compile import eager

    out: dict = {}
    with autocast_ctx(), eager():  # evaluation's shapes are not training's: no compiling for them
        if val:
            out["val_loss"] = masked_loss(model, val, tokenizer.pad_id or 0)
        if mc_items:
            acc = mc_accuracy(model, tokenizer, render, mc_items, examples=mc_examples)
            out["mc_acc"], out["mc_acc_norm"] = acc["acc"], acc["acc_norm"]
    return out


def samples(model: Any, tokenizer: Any, val: list, n: int, max_tokens: int) -> list[dict]:
    """Greedy answers to the first n validation prompts (the prompt is everything before the first trained token)."""
    from lmforge.training.compile import eager
    from lmforge.training.evaluate import sample

    out = []
    for ex in val[:n]:
        cut = ex.train.index(True)
        with eager():
            ids = sample(model, ex.ids[:cut], max_tokens, temperature=0.0, stop_ids=tokenizer.stop_ids)
        prompt = tokenizer.decode(ex.ids[:cut], skip_special_tokens=False)
        expected = tokenizer.decode([i for i, t in zip(ex.ids, ex.train) if t], skip_special_tokens=True)
        ids = [i for i in ids if i < tokenizer.vocab_size]  # a model's embedding may be padded past the vocabulary
        out.append({"prompt": prompt, "text": tokenizer.decode(ids), "expected": expected})
    return out


# ---- the recipe -------------------------------------------------------------------------------------------
def run(cfg: SFTConfig) -> int:
    from lmforge.data.sft import chat_renderer
    from lmforge.finetune.heldout import mc_examples as build_mc
    from lmforge.model.accounting import flops_per_token_train
    from lmforge.training import precision
    from lmforge.training.compile import maybe_compile
    from lmforge.training.metrics import MetricsWriter, ProgressBar, plot_loss
    from lmforge.training.monitor import Throughput, peak_flops
    from lmforge.training.optim import build_optimizer
    from lmforge.training.report import write_summary
    from lmforge.training.schedule import lr_at, set_lr
    from lmforge.training.state import restore
    from lmforge.training.step import clip_grad_norm, lm_loss_sum, loss_scale
    from lmforge.training.stop import StopRequest

    t = cfg.train
    if t.batch_size < 1 or t.grad_accum < 1:
        raise LmforgeError("--batch-size and --grad-accum must be at least 1")
    opened = runs.open_run(cfg, cfg.lora.enabled)
    if opened is None:
        return 0
    rt, run_dir, kind, resumed = opened

    # -- the base model, LoRA or not (a LoRA base frozen in the autocast dtype: the same numbers, no per-step cast)
    amp = precision.resolve_dtype(t.dtype, rt.device)
    base = load_base(cfg.base, cfg.lora, t.seed, rt.device, cfg.chat_template,
                     resumed=resumed if cfg.lora.enabled else None, frozen_dtype=amp)
    model, tok = base.model, base.tokenizer
    if resumed is not None and not cfg.lora.enabled:
        model.load_state_dict(resumed.weights)
    for note in base.notes:
        runs.log(f"note: {note}")
    runs.log(f"model: {base.path} ({'LoRA' if base.lora else 'full finetuning'}): {base.trainable:,} trainable of "
             f"{base.total:,} parameters ({100 * base.trainable / base.total:.2f}%)")

    def autocast_ctx():
        return precision.autocast(rt.device, amp)

    model.activation_checkpointing = t.activation_checkpointing
    seq_len = min(t.seq_len, model.cfg.max_seq_len)
    render = chat_renderer(tok, base.template)

    # -- data
    data = load_data(cfg, tok, base.template, seq_len, run_dir)
    train, val, stats, mc_items = data["train"], data["val"], data["stats"], data["mc_items"]
    runs.log(_stats_line(stats, len(train), len(val)))
    mc_ex = build_mc(tok, render, mc_items) if mc_items else None
    pad = tok.pad_id if tok.pad_id is not None else 0
    loader = ExampleLoader([len(e) for e in train], seq_len, t.batch_size, cfg.pack, t.seed)
    steps_per_epoch = math.ceil(loader.rows_per_epoch / t.batch_size / t.grad_accum)
    budget = Budget.resolve(t, epochs=t.epochs, steps_per_epoch=steps_per_epoch)

    # -- compile (batches vary in length: one dynamic-shape graph), optimizer; resume
    steps = budget.steps_at_least(t.batch_size * t.grad_accum * seq_len)  # a step holds at most this many tokens
    maybe_compile(model, t.compile, rt.device, steps, t.max_time, runs.log, dynamic=True)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2))
    step, tokens, train_tokens, seconds = 0, 0, 0, 0.0
    before: dict = {}
    if resumed is not None:
        st = resumed.state
        restore(model, optimizer, st)
        loader.load_state_dict(st["loader"])
        step, tokens, train_tokens, seconds = st["step"], st["tokens"], st["train_tokens"], st["seconds"]
        before = st.get("before", {})
    else:
        t0 = time.perf_counter()
        before = evaluate(model, tok, val, mc_items, render, autocast_ctx, mc_ex)
        runs.log(f"before training (base model): {runs.scores_line(before)} [{time.perf_counter() - t0:.1f}s]")
    lineage = {"stage": "sft", "base_model": str(base.path), "base_lineage": base.lineage, "data": data["source"],
               "method": "lora" if base.lora else "full"}

    # -- monitoring
    metrics = MetricsWriter(run_dir, resume_step=step if resumed is not None else None,
                            tensorboard=t.tensorboard)
    peak = peak_flops(rt.device, amp, t.peak_flops)
    flops_tok = flops_per_token_train(model.cfg, seq_len)
    if base.lora:  # no weight gradients for frozen matrices: about 2/3 of full training's matmul FLOPs
        flops_tok *= 2 / 3
    monitor = Throughput(flops_tok, peak)
    bar = ProgressBar(budget.total, budget.unit, start=budget.position(step, tokens, seconds))

    def done() -> bool:
        return budget.done(step, tokens, seconds)

    def save(out: Path) -> Path:
        """A checkpoint that resumes this run exactly."""
        st = {"step": step, "tokens": tokens, "train_tokens": train_tokens, "seconds": seconds,
              "loader": loader.state_dict(), "before": before}
        return runs.save_resumable(base, model, optimizer, rt, out, st, lineage)

    # -- the loop
    model.train()
    last: dict = {}
    with StopRequest(runs.log) as stop:
        while not done() and not stop.requested:
            t_step = time.perf_counter()
            progress = budget.progress(step, tokens, seconds)
            lr = lr_at(step, progress, t.lr, t.warmup_steps, t.schedule, t.min_lr_ratio, t.decay_fraction)
            set_lr(optimizer, lr)
            batches = [collate(train, loader.next_rows(), pad) for _ in range(t.grad_accum)]
            n_targets = sum(int(b["loss_mask"].sum()) for b in batches)
            scale = loss_scale(n_targets)
            loss_sum = 0.0
            for b in batches:
                b = {k: (v.to(rt.device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
                with autocast_ctx():
                    loss = lm_loss_sum(model, b["input_ids"], b["targets"], fused=t.fused_loss,
                                       input_pos=b["input_pos"], mask=b["attn_mask"])
                (loss * scale).backward()
                loss_sum += float(loss.detach())
            grad_norm = clip_grad_norm(model, t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_tokens = sum(int(b["input_ids"].numel()) for b in batches)
            step += 1
            tokens += step_tokens
            train_tokens += n_targets
            dt = time.perf_counter() - t_step
            seconds += dt
            monitor.add(step_tokens, dt)
            last = {"loss": loss_sum / n_targets}

            record: dict = {}
            if step % t.log_every == 0 or done():
                rate = monitor.rate()
                record.update(step=step, tokens=tokens, train_tokens=train_tokens, loss=last["loss"], lr=lr,
                              grad_norm=grad_norm, epoch=loader.epochs_done, tokens_per_s=rate["tokens_per_s"],
                              mfu=rate["mfu"], seconds=seconds)
            if (t.eval_every and step % t.eval_every == 0) or done():
                ev = evaluate(model, tok, val, mc_items if done() else [], render, autocast_ctx, mc_ex)
                record.update(step=step, tokens=tokens, **ev)
                last.update(ev)
            if record:
                metrics.write(record)
                line = runs.record_line(record, ("step", "loss", "val_loss", "mc_acc", "lr", "tokens_per_s"))
                bar.update(budget.position(step, tokens, seconds), last["loss"], record.get("tokens_per_s"), line=line)
            if t.save_every and step % t.save_every == 0 and not done():
                rundir.save_step(run_dir, step, save, t.keep_last, kind)
    bar.close()
    metrics.close()
    if stop.requested:
        return rundir.interrupted(run_dir, step, save, t.keep_last, kind, runs.log)

    # -- outputs
    lineage.update(steps=step, tokens=tokens, train_tokens=train_tokens, seconds=round(seconds, 1))
    written = save_final(base, model, run_dir, lineage, merge=cfg.lora.merge)
    after = {k: v for k, v in last.items() if k != "loss"}
    peak_mem = runs.peak_memory_bytes(rt.device)
    plot = plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"SFT {run_dir.name}")
    results: dict = {}
    for k in ("val_loss", "mc_acc", "mc_acc_norm"):
        if k in before or k in after:
            results[f"{k}_base"] = before.get(k)
            results[f"{k}_finetuned"] = after.get(k)
    summary = {
        "stage": "finetune sft", "title": f"SFT: {run_dir.name}", "status": "complete", "run_dir": str(run_dir),
        "data": {"source": data["source"], **stats.as_dict(), "train_examples": len(train),
                 "validation_examples": len(val), "assistant_only_loss": not cfg.train_on_all, "packing": cfg.pack},
        "model": runs.model_section(base, cfg.lora),
        "training": {"steps": step, "tokens": tokens, "trained_tokens": train_tokens, "epochs": loader.epochs_done,
                     "lr": t.lr, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "seq_len": seq_len,
                     "precision": precision.dtype_name(amp)},
        "compute": {"seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
                    "train_flops": monitor.flops_total, "peak_memory_mb": peak_mem / 2**20, "device": str(rt.device)},
        "results": results,
        "outputs": written,
        "samples": samples(model, tok, val, t.samples, t.sample_tokens) if t.samples else [],
        "plots": [plot.name] if plot else [],
        "notes": base.notes,
    }
    write_summary(run_dir, summary)
    runs.log(f"trained {step} steps, {tokens:,} tokens in {seconds:.0f}s ({tokens / max(seconds, 1e-9):,.0f} tok/s); "
             f"peak memory {peak_mem / 2**20:,.0f} MB")
    if results:
        runs.log("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if v is not None))
    runs.log(f"wrote {', '.join(written.values())} and {run_dir / 'report.md'}")
    print(written.get("final") or written.get("adapter"))
    return 0
