"""`lmforge finetune kto`: Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on unpaired ratings: each record
is one completion marked desirable or not, as thumbs up/down give them (`lmforge feedback export --format kto`).

    lmforge finetune kto --base runs/sft/final --data ratings.jsonl --out runs/kto --lora [--beta 0.1]
        [--desirable-weight 1.0 --undesirable-weight 1.0]

Records are TRL's {"prompt", "completion", "label": true|false} (strings or message lists; data/preference.py).
Each step: the step's records (every micro-batch of it) first give the reference point z0, KTO's estimate of
KL(pi || ref): their prompts paired with the completion of the record before them in the step (TRL's offset of
one), scored under the policy and the reference without gradients, mean(log pi - log ref) clamped at 0. Then each
micro-batch runs policy and reference over its own completions and finetune/losses.kto_loss gives the loss; the
step's loss is the mean over the step's records. z0 is one number per step whatever the micro-batching, so
grad_accum 1 x 8 and 8 x 1 give the same update. A step needs two or more records (a batch of one has no
mismatched pair).

The reference is the frozen start, never a second copy in memory (as dpo.py): with LoRA the same model with every
adapter bypassed; with full finetuning the reference log-probs of each record and of each KL pair the run will
visit are computed once before the first update (the data order is known in advance).

The paper's advice on the weights: keep desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in
[1, 4/3]; the log says where the data stands. Held-out scoring before and after: the KTO loss on held-out
records, the rewards of desirable and undesirable completions and their margin (0 for the base model).
Budget, checkpoints, exact resume and the outputs are those of sft/dpo.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import opt
from lmforge.data.preference import load_unpaired, mismatched
from lmforge.data.sft import Example, ExampleLoader, collate
from lmforge.data.split import holdout_split
from lmforge.errors import LmforgeError
from lmforge.finetune import runs
from lmforge.finetune.weights import LoraOptions, load_base, save_final
from lmforge.training import rundir
from lmforge.training.budget import Budget
from lmforge.training.config import TrainConfig


@dataclass
class KTOTrain(TrainConfig):
    """TrainConfig with preference-tuning defaults."""

    max_steps: int | None = opt(None, "optimizer steps to train for (default: --train.epochs over the records)",
                                flag="--max-steps")
    epochs: float = opt(1.0, "passes over the records when no step, token or time limit is given")
    batch_size: int = opt(8, "records per micro-batch", flag="--batch-size")
    seq_len: int = opt(512, "longest prompt + completion in tokens (longer ones are truncated and counted)",
                       flag="--seq-len")
    lr: float = opt(5e-5, "peak learning rate", flag="--lr")
    warmup_steps: int = opt(10, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay (matrices only)")
    eval_every: int = opt(50, "steps between held-out evaluations (0: only before and after)", flag="--eval-every")
    log_every: int = opt(5, "steps between metrics lines")
    save_every: int = opt(0, "steps between checkpoints (0: only the final one)", flag="--save-every")
    samples: int = opt(0, "sample generations in the report")


@dataclass
class KTOConfig:
    base: str = opt("", "model to tune and, frozen, the reference (e.g. runs/sft/final)")
    data: str = opt("", "JSONL of {prompt, completion, label} records (strings or message lists), or a directory")
    out: str = opt("runs/kto", "run directory")
    val_data: str = opt("", "held-out JSONL of the same shape (default: --val-fraction of --data)")
    val_fraction: float = opt(0.05, "share of --data held out when --val-data is not given")
    beta: float = opt(0.1, "strength of the pull towards the reference (KTO's beta)", flag="--beta")
    desirable_weight: float = opt(1.0, "weight of desirable records' losses (lambda_D)", flag="--desirable-weight")
    undesirable_weight: float = opt(1.0, "weight of undesirable records' losses (lambda_U)",
                                    flag="--undesirable-weight")
    skip_bad: bool = opt(False, "skip malformed lines (counted) instead of stopping at the first")
    chat_template: str = opt("", "Jinja file to render conversations with (default: the base tokenizer's)")
    val_max: int = opt(128, "held-out records scored at each evaluation (the first N of the held-out set)")
    lora: LoraOptions = opt(default_factory=LoraOptions)
    train: KTOTrain = opt(default_factory=KTOTrain)


def load_data(cfg: KTOConfig, tokenizer: Any, template: str, seq_len: int) -> dict:
    if not cfg.data:
        raise LmforgeError("give the ratings: --data ratings.jsonl ({prompt, completion, label} per line; "
                           "`lmforge feedback export --format kto` writes them)")
    items, stats = load_unpaired(cfg.data, tokenizer, seq_len, skip_bad=cfg.skip_bad, template=template)
    if cfg.val_data:
        train = items
        val, _ = load_unpaired(cfg.val_data, tokenizer, seq_len, skip_bad=cfg.skip_bad, template=template)
    else:
        train, val = holdout_split(items, cfg.val_fraction, cfg.train.seed)
    return {"train": train, "val": val[:cfg.val_max], "stats": stats, "source": cfg.data}


def step_plan(loader: ExampleLoader, steps: int, grad_accum: int) -> list[list[list[int]]]:
    """The record indices of each micro-batch of the next `steps` steps of `loader` (loader unchanged)."""
    probe = ExampleLoader(loader.lengths, loader.seq_len, loader.batch_size, loader.pack, loader.seed)
    probe.load_state_dict(loader.state_dict())
    return [[[i for row in probe.next_rows() for i in row] for _ in range(grad_accum)] for _ in range(steps)]


def logps(model: Any, examples: list[Example], pad: int, device: Any) -> Any:
    """Summed log p of each example's completion tokens [n], in one forward (with grad when enabled)."""
    from lmforge.finetune.losses import sequence_logps

    b = collate(examples, [[k] for k in range(len(examples))], pad)
    logits = model(b["input_ids"].to(device))
    return sequence_logps(logits, b["targets"].to(device), b["loss_mask"].to(device))


def run(cfg: KTOConfig) -> int:
    from lmforge.data.sft import chat_renderer
    from lmforge.finetune.heldout import example_logps
    from lmforge.finetune.losses import kto_loss, kto_stats
    from lmforge.model.accounting import flops_per_token_train
    from lmforge.model.lora import lora_disabled
    from lmforge.training import precision
    from lmforge.training.compile import eager, maybe_compile
    from lmforge.training.metrics import MetricsWriter, ProgressBar, plot_loss
    from lmforge.training.monitor import Throughput, peak_flops
    from lmforge.training.optim import build_optimizer
    from lmforge.training.report import write_summary
    from lmforge.training.schedule import lr_at, set_lr
    from lmforge.training.state import restore
    from lmforge.training.step import clip_grad_norm
    from lmforge.training.stop import StopRequest

    t = cfg.train
    if t.batch_size < 1 or t.grad_accum < 1:
        raise LmforgeError("--batch-size and --grad-accum must be at least 1")
    if t.batch_size * t.grad_accum < 2:
        raise LmforgeError("KTO needs two or more records per step for its KL estimate (mismatched pairs); raise "
                           "--batch-size or --train.grad-accum")
    if cfg.beta <= 0 or cfg.desirable_weight <= 0 or cfg.undesirable_weight <= 0:
        raise LmforgeError("--beta, --desirable-weight and --undesirable-weight must be positive")
    opened = runs.open_run(cfg, cfg.lora.enabled)
    if opened is None:
        return 0
    rt, run_dir, kind, resumed = opened

    amp = precision.resolve_dtype(t.dtype, rt.device)
    base = load_base(cfg.base, cfg.lora, t.seed, rt.device, cfg.chat_template,
                     resumed=resumed if cfg.lora.enabled else None, frozen_dtype=amp)
    model, tok = base.model, base.tokenizer
    for note in base.notes:
        runs.log(f"note: {note}")
    runs.log(f"model: {base.path} ({'LoRA' if base.lora else 'full finetuning'}): {base.trainable:,} trainable of "
             f"{base.total:,} parameters; reference: "
             f"{'the base with adapters disabled' if base.lora else 'log-probs computed once up front'}")

    def autocast_ctx():
        return precision.autocast(rt.device, amp)

    model.activation_checkpointing = t.activation_checkpointing
    seq_len = min(t.seq_len, model.cfg.max_seq_len)
    render = chat_renderer(tok, base.template)
    data = load_data(cfg, tok, base.template, seq_len)
    train, val, stats = data["train"], data["val"], data["stats"]
    n_good = sum(x.desirable for x in train)
    n_bad = len(train) - n_good
    balance = cfg.desirable_weight * n_good / max(cfg.undesirable_weight * n_bad, 1e-9)
    runs.log(f"data: {stats.records} records -> {len(train)} train ({n_good} desirable, {n_bad} undesirable) / "
             f"{len(val)} held-out; truncated {stats.truncated}, dropped {stats.dropped_empty}, skipped malformed "
             f"{stats.skipped_bad}; weighted desirable:undesirable {balance:.2f} (the paper advises 1 to 1.33)")
    pad = tok.pad_id if tok.pad_id is not None else 0
    flags = torch.tensor([x.desirable for x in train], dtype=torch.bool)

    def reference(examples: list[Example]) -> Any:
        with torch.no_grad(), autocast_ctx(), lora_disabled(model):
            return logps(model, examples, pad, rt.device)

    # -- held-out: the records and their mismatched pairs, with reference log-probs computed while the weights are
    #    the base's (a resumed full run loads its checkpoint weights only below)
    val_kl = mismatched(tok, render, val, list(range(len(val))), seq_len) if len(val) >= 2 else []
    with autocast_ctx(), lora_disabled(model), eager():
        val_ref = torch.tensor(example_logps(model, [x.example for x in val], pad)[0], dtype=torch.float64)
        val_ref_kl = torch.tensor(example_logps(model, val_kl, pad)[0], dtype=torch.float64)
    val_flags = torch.tensor([x.desirable for x in val], dtype=torch.bool)

    def evaluate() -> dict:
        if not val_kl:
            return {}
        with autocast_ctx(), eager():  # evaluation's shapes are not training's: no compiling for them
            pol = torch.tensor(example_logps(model, [x.example for x in val], pad)[0], dtype=torch.float64)
            pol_kl = torch.tensor(example_logps(model, val_kl, pad)[0], dtype=torch.float64)
        losses, rewards, z0 = kto_loss(pol, val_ref, val_flags, pol_kl, val_ref_kl, cfg.beta, cfg.desirable_weight,
                                       cfg.undesirable_weight)
        return {"val_loss": float(losses.mean()), "val_kl": float(z0),
                **{f"val_{k}": v for k, v in kto_stats(rewards, val_flags).items()}}

    loader = ExampleLoader([len(x.example) for x in train], seq_len, t.batch_size, False, t.seed)
    steps_per_epoch = math.ceil(loader.rows_per_epoch / t.batch_size / t.grad_accum)
    budget = Budget.resolve(t, epochs=t.epochs, steps_per_epoch=steps_per_epoch)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2))
    step, tokens, seconds = 0, 0, 0.0
    if resumed is not None:
        loader.load_state_dict(resumed.state["loader"])
        step = resumed.step

    # -- full finetuning: the reference of every record and KL pair the run will visit, before the first update
    ref_of: dict[Any, float] = {}
    if not base.lora:
        if budget.horizon is None:
            raise LmforgeError("full-weight KTO needs its length in steps (--max-steps or --train.epochs) to "
                               "compute the reference up front; give one, or train with --lora")
        t0 = time.perf_counter()
        plan = step_plan(loader, budget.horizon - step, t.grad_accum)
        records = sorted({i for s in plan for m in s for i in m})
        pairs = sorted({(flat[k], flat[k - 1]) for s in plan for flat in [[i for m in s for i in m]]
                        for k in range(len(flat))})
        with eager():
            lp = example_logps(model, [train[i].example for i in records], pad)[0] if records else []
            ref_of.update(zip(records, lp))
            kl_ex = [mismatched(tok, render, train, [i, j], seq_len)[0] for i, j in pairs]  # prompt i, completion j
            ref_of.update(zip(pairs, example_logps(model, kl_ex, pad)[0] if kl_ex else []))
        runs.log(f"reference log-probs of {len(records)} records and {len(pairs)} KL pairs "
                 f"[{time.perf_counter() - t0:.1f}s]")

    if resumed is not None:
        st = resumed.state
        if not base.lora:
            model.load_state_dict(resumed.weights)
        restore(model, optimizer, st)
        tokens, seconds, before = st["tokens"], st["seconds"], st.get("before", {})
    else:
        before = evaluate()
        runs.log(f"before training: {runs.scores_line(before)}")
    lineage = {"stage": "kto", "base_model": str(base.path), "base_lineage": base.lineage, "data": data["source"],
               "method": "lora" if base.lora else "full", "beta": cfg.beta,
               "desirable_weight": cfg.desirable_weight, "undesirable_weight": cfg.undesirable_weight}

    # compiled (past the break-even): the policy pass, the no-grad KL pass and (LoRA) the adapter-disabled
    # reference pass, each a dynamic-shape graph compiled once
    steps = budget.steps_at_least(2 * t.batch_size * t.grad_accum * seq_len)  # a step holds at most this many
    maybe_compile(model, t.compile, rt.device, steps, t.max_time, runs.log, dynamic=True)
    metrics = MetricsWriter(run_dir, resume_step=step if resumed is not None else None, tensorboard=t.tensorboard)
    peak = peak_flops(rt.device, amp, t.peak_flops)
    # policy forward + backward, a no-grad forward of the KL pairs, and (LoRA) reference forwards of both
    flops_tok = flops_per_token_train(model.cfg, seq_len) * ((2 / 3 + 1 / 3 + 2 / 3) if base.lora else 4 / 3)
    monitor = Throughput(flops_tok, peak)
    bar = ProgressBar(budget.total, budget.unit, start=budget.position(step, tokens, seconds))

    def save(out: Path) -> Path:
        st = {"step": step, "tokens": tokens, "seconds": seconds, "loader": loader.state_dict(), "before": before}
        return runs.save_resumable(base, model, optimizer, rt, out, st, lineage)

    def done() -> bool:
        return budget.done(step, tokens, seconds)

    def ref_logps(idx: list[int], keys: list, examples: list[Example]) -> Any:
        if base.lora:
            return reference(examples)
        return torch.tensor([ref_of[k] for k in keys], dtype=torch.float32, device=rt.device)

    model.train()
    last: dict = {}
    with StopRequest(runs.log) as stop:
        while not done() and not stop.requested:
            t_step = time.perf_counter()
            lr = lr_at(step, budget.progress(step, tokens, seconds), t.lr, t.warmup_steps, t.schedule,
                       t.min_lr_ratio, t.decay_fraction)
            set_lr(optimizer, lr)
            micro = [[i for row in loader.next_rows() for i in row] for _ in range(t.grad_accum)]
            flat = [i for m in micro for i in m]
            # z0: the step's prompts with the completion of the record before them, policy and reference, no grad
            kl_ex = mismatched(tok, render, train, flat, seq_len)
            with torch.no_grad(), autocast_ctx():
                pol_kl = logps(model, kl_ex, pad, rt.device)
            ref_kl = ref_logps(flat, [(flat[k], flat[k - 1]) for k in range(len(flat))], kl_ex)
            step_tokens, loss_sum, rewards = sum(len(e) for e in kl_ex), 0.0, []
            for idx in micro:
                ex = [train[i].example for i in idx]
                ref = ref_logps(idx, idx, ex)
                with autocast_ctx():
                    pol = logps(model, ex, pad, rt.device)
                losses, r, z0 = kto_loss(pol, ref.to(pol.dtype), flags[idx].to(rt.device), pol_kl,
                                         ref_kl.to(pol_kl.dtype), cfg.beta, cfg.desirable_weight,
                                         cfg.undesirable_weight)
                (losses.sum() / len(flat)).backward()  # the step's loss is the mean over all of its records
                loss_sum += float(losses.detach().sum())
                rewards.append(r)
                step_tokens += sum(len(e) for e in ex)
            grad_norm = clip_grad_norm(model, t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            dt = time.perf_counter() - t_step
            seconds += dt
            monitor.add(step_tokens, dt)
            last = {"loss": loss_sum / len(flat), "kl": float(z0),
                    **kto_stats(torch.cat(rewards).cpu(), flags[flat])}

            record: dict = {}
            if step % t.log_every == 0 or done():
                rate = monitor.rate()
                record.update(step=step, tokens=tokens, **last, lr=lr, grad_norm=grad_norm, epoch=loader.epochs_done,
                              tokens_per_s=rate["tokens_per_s"], mfu=rate["mfu"], seconds=seconds)
            if (t.eval_every and step % t.eval_every == 0) or done():
                ev = evaluate()
                record.update(step=step, tokens=tokens, **ev)
                last.update(ev)
            if record:
                metrics.write(record)
                line = runs.record_line(record, ("step", "loss", "kl", "reward_margin", "val_loss",
                                                 "val_reward_margin"))
                bar.update(budget.position(step, tokens, seconds), last["loss"], record.get("tokens_per_s"), line=line)
            if t.save_every and step % t.save_every == 0 and not done():
                rundir.save_step(run_dir, step, save, t.keep_last, kind)
    bar.close()
    metrics.close()
    if stop.requested:
        return rundir.interrupted(run_dir, step, save, t.keep_last, kind, runs.log)

    lineage.update(steps=step, tokens=tokens, seconds=round(seconds, 1))
    written = save_final(base, model, run_dir, lineage, merge=cfg.lora.merge)
    peak_mem = runs.peak_memory_bytes(rt.device)
    plot = plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"KTO {run_dir.name}")
    results: dict = {}
    for k in ("val_loss", "val_reward_margin", "val_kl"):
        if k in before or k in last:
            results[f"{k}_base"] = before.get(k)
            results[f"{k}_finetuned"] = last.get(k)
    summary = {
        "stage": "finetune kto", "title": f"KTO: {run_dir.name}", "status": "complete", "run_dir": str(run_dir),
        "data": {"source": data["source"], **stats.as_dict(), "train_records": len(train),
                 "desirable": n_good, "undesirable": n_bad, "heldout_records": len(val)},
        "model": runs.model_section(base, cfg.lora),
        "training": {"steps": step, "tokens": tokens, "epochs": loader.epochs_done, "beta": cfg.beta,
                     "desirable_weight": cfg.desirable_weight, "undesirable_weight": cfg.undesirable_weight,
                     "lr": t.lr, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "seq_len": seq_len,
                     "reference": "adapters disabled" if base.lora else "precomputed log-probs",
                     "precision": precision.dtype_name(amp)},
        "compute": {"seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9), "train_flops": monitor.flops_total,
                    "peak_memory_mb": peak_mem / 2**20, "device": str(rt.device)},
        "results": results,
        "outputs": written,
        "plots": [plot.name] if plot else [],
        "notes": base.notes,
    }
    write_summary(run_dir, summary)
    runs.log(f"trained {step} steps, {tokens:,} tokens in {seconds:.0f}s; peak memory {peak_mem / 2**20:,.0f} MB")
    if results:
        runs.log("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if v is not None))
    runs.log(f"wrote {', '.join(written.values())} and {run_dir / 'report.md'}")
    print(written.get("final") or written.get("adapter"))
    return 0

