"""`lmforge finetune dpo`: preference tuning with Direct Preference Optimization (Rafailov et al. 2023), or IPO.

    lmforge finetune dpo --base runs/sft/final --data prefs.jsonl --out runs/dpo [--lora] [--beta 0.1] [--loss ipo]
    lmforge finetune dpo --base runs/sft/final --data builtin      # stdlib questions: right docstring over a wrong one

The reference model is the frozen starting point, and it is never a second copy in memory:
  LoRA  the reference is the base without the adapter: each step runs the batch once more with every adapter
        bypassed (model.lora.lora_disabled), under no_grad.
  full  the reference log-probabilities of every pair (train and held-out) are computed once, before the first
        update, and kept as two numbers per pair.
Each step: the chosen and rejected responses of the step's pairs run in one forward pass; their summed log-probs
(token-averaged for IPO) go into finetune/losses.dpo_loss; the loss is the mean over the step's pairs. The log
shows the implicit rewards beta * (log pi - log ref) of chosen and rejected answers, their margin and the preference
accuracy (share of pairs whose chosen reward is higher), on training batches and on held-out pairs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import opt
from lmforge.data.preference import Pair, load_preferences, pair_examples
from lmforge.data.sft import ExampleLoader, collate
from lmforge.data.split import holdout_split
from lmforge.errors import LmforgeError
from lmforge.finetune import runs
from lmforge.finetune.losses import DPO_LOSS_TYPES
from lmforge.finetune.weights import LoraOptions, load_base, save_final
from lmforge.training import rundir
from lmforge.training.budget import Budget
from lmforge.training.config import TrainConfig


@dataclass
class DPOTrain(TrainConfig):
    """TrainConfig with preference-tuning defaults."""

    max_steps: int | None = opt(None, "optimizer steps to train for (default: --train.epochs over the pairs)",
                                flag="--max-steps")
    epochs: float = opt(1.0, "passes over the preference pairs when no step, token or time limit is given")
    batch_size: int = opt(8, "preference pairs per micro-batch", flag="--batch-size")
    seq_len: int = opt(512, "longest prompt + response in tokens (longer ones are truncated and counted)",
                       flag="--seq-len")
    lr: float = opt(5e-5, "peak learning rate", flag="--lr")
    warmup_steps: int = opt(10, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay (matrices only)")
    eval_every: int = opt(50, "steps between held-out evaluations (0: only before and after)", flag="--eval-every")
    log_every: int = opt(5, "steps between metrics lines")
    save_every: int = opt(0, "steps between checkpoints (0: only the final one)", flag="--save-every")
    samples: int = opt(0, "sample generations in the report")


@dataclass
class DPOConfig:
    base: str = opt("", "model to tune and, frozen, the reference (e.g. runs/sft/final)")
    data: str = opt("builtin", "JSONL of {prompt, chosen, rejected} (strings or message lists), a directory of "
                               "them, or 'builtin'")
    out: str = opt("runs/dpo", "run directory")
    val_data: str = opt("", "held-out preference JSONL (default: --val-fraction of --data; builtin: its held-out "
                            "split)")
    val_fraction: float = opt(0.05, "share of --data held out when --val-data is not given")
    beta: float = opt(0.1, "strength of the pull towards the reference (DPO's beta)", flag="--beta")
    loss: str = opt("sigmoid", "sigmoid: DPO; ipo: IPO (token-averaged log-probs)", choices=list(DPO_LOSS_TYPES),
                    flag="--loss")
    label_smoothing: float = opt(0.0, "assumed share of flipped labels (conservative DPO); 0 = plain DPO")
    skip_bad: bool = opt(False, "skip malformed lines (counted) instead of stopping at the first")
    chat_template: str = opt("", "Jinja file to render conversations with (default: the base tokenizer's)")
    val_max: int = opt(128, "held-out pairs scored at each evaluation (the first N of the held-out set)")
    heldout_mc: int = opt(100, "builtin: held-out multiple-choice questions scored before and after (0: none)")
    lora: LoraOptions = opt(default_factory=LoraOptions)
    train: DPOTrain = opt(default_factory=DPOTrain)


def load_data(cfg: DPOConfig, tokenizer: Any, template: str, seq_len: int, run_dir: Path) -> dict:
    """Train/held-out preference pairs, read statistics, and (builtin) the held-out multiple-choice items."""
    mc_items: list[dict] = []
    if cfg.data == "builtin":
        from lmforge.data import builtin_sets

        builtin_sets.write_builtin_sets(run_dir / "data")
        tr = [(f"builtin pref-train {i + 1}", r) for i, r in enumerate(builtin_sets.preference_records("train"))]
        va = [(f"builtin pref-heldout {i + 1}", r)
              for i, r in enumerate(builtin_sets.preference_records("heldout")[:cfg.val_max])]
        train, stats = load_preferences("builtin", tokenizer, seq_len, template=template, records=tr)
        val, _ = load_preferences("builtin", tokenizer, seq_len, template=template, records=va)
        mc_items = builtin_sets.heldout_mc()[:cfg.heldout_mc] if cfg.heldout_mc > 0 else []
        source = "builtin (stdlib docstring preferences)"
    else:
        pairs, stats = load_preferences(cfg.data, tokenizer, seq_len, skip_bad=cfg.skip_bad, template=template)
        if cfg.val_data:
            train = pairs
            val, _ = load_preferences(cfg.val_data, tokenizer, seq_len, skip_bad=cfg.skip_bad, template=template)
        else:
            train, val = holdout_split(pairs, cfg.val_fraction, cfg.train.seed)
        source = cfg.data
    return {"train": train, "val": val[:cfg.val_max], "stats": stats, "mc_items": mc_items, "source": source}


def visited_pairs(loader: ExampleLoader, micro_batches: int) -> set[int]:
    """Indices of the pairs the next `micro_batches` micro-batches of `loader` will hold (loader unchanged)."""
    probe = ExampleLoader(loader.lengths, loader.seq_len, loader.batch_size, loader.pack, loader.seed)
    probe.load_state_dict(loader.state_dict())
    out: set[int] = set()
    for _ in range(max(0, micro_batches)):
        out.update(i for row in probe.next_rows() for i in row)
        if len(out) == len(loader.lengths):
            break
    return out


def policy_logps(model: Any, pairs: list[Pair], idx: list[int], pad: int, device: Any,
                 average: bool) -> tuple[Any, Any, int]:
    """log pi(chosen), log pi(rejected) [n] for pairs idx in one forward over 2n rows; and the tokens it ran."""
    from lmforge.finetune.losses import sequence_logps

    examples, rows = pair_examples(pairs, idx)
    b = collate(examples, rows, pad)
    x = b["input_ids"].to(device)
    logits = model(x)
    lp = sequence_logps(logits, b["targets"].to(device), b["loss_mask"].to(device), average=average)
    n = len(idx)
    return lp[:n], lp[n:], int(torch.numel(x))


def run(cfg: DPOConfig) -> int:
    from lmforge.finetune.heldout import mc_accuracy, mc_examples, pair_logps
    from lmforge.finetune.losses import dpo_loss, preference_stats
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
    if cfg.beta <= 0:
        raise LmforgeError(f"--beta must be positive, got {cfg.beta}")
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
             f"{base.total:,} parameters ({100 * base.trainable / base.total:.2f}%); reference: "
             f"{'the base with adapters disabled' if base.lora else 'log-probs computed once up front'}")

    def autocast_ctx():
        return precision.autocast(rt.device, amp)

    model.activation_checkpointing = t.activation_checkpointing
    seq_len = min(t.seq_len, model.cfg.max_seq_len)
    from lmforge.data.sft import chat_renderer

    render = chat_renderer(tok, base.template)
    data = load_data(cfg, tok, base.template, seq_len, run_dir)
    train, val, stats, mc_items = data["train"], data["val"], data["stats"], data["mc_items"]
    runs.log(f"data: {stats.records} records -> {len(train)} train / {len(val)} held-out pairs; truncated "
             f"{stats.truncated}, dropped (a response truncated away) {stats.dropped_empty}, skipped malformed "
             f"{stats.skipped_bad}")
    pad = tok.pad_id if tok.pad_id is not None else 0
    average = cfg.loss == "ipo"
    mc_ex = mc_examples(tok, render, mc_items) if mc_items else None

    def evaluate(with_mc: bool) -> dict:
        out: dict = {}
        with autocast_ctx(), eager():  # evaluation's shapes are not training's: no compiling for them
            if val:
                pc, pr = pair_logps(model, val, pad, average)
                losses, cr, rj = dpo_loss(pc, pr, val_ref[0], val_ref[1], cfg.beta, cfg.loss, cfg.label_smoothing)
                out["val_loss"] = float(losses.mean())
                out.update({f"val_{k}": v for k, v in preference_stats(cr, rj).items()})
                # the model's own preference, comparable between base and tuned: log p(chosen) > log p(rejected)
                out["val_logp_accuracy"] = float((pc > pr).double().mean())
            if with_mc and mc_items:
                acc = mc_accuracy(model, tok, render, mc_items, examples=mc_ex)
                out["mc_acc"], out["mc_acc_norm"] = acc["acc"], acc["acc_norm"]
        return out

    loader = ExampleLoader([max(len(p.chosen), len(p.rejected)) for p in train], seq_len, t.batch_size, False,
                           t.seed)
    steps_per_epoch = math.ceil(loader.rows_per_epoch / t.batch_size / t.grad_accum)
    budget = Budget.resolve(t, epochs=t.epochs, steps_per_epoch=steps_per_epoch)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2))
    step, tokens, seconds = 0, 0, 0.0
    if resumed is not None:
        loader.load_state_dict(resumed.state["loader"])
        step = resumed.step

    # -- the reference, computed while the weights are still the base's (a resumed full run loads its checkpoint
    #    weights only afterwards): held-out pairs always; training pairs for full finetuning, and only those the
    #    run will visit when its length is known in steps. LoRA runs get training references per step instead.
    t0 = time.perf_counter()
    with autocast_ctx(), lora_disabled(model), eager():
        val_ref = pair_logps(model, val, pad, average) if val else None
        train_ref = None
        if not base.lora:
            need = (visited_pairs(loader, (budget.horizon - step) * t.grad_accum) if budget.horizon
                    else range(len(train)))
            need = sorted(need)
            c, r = pair_logps(model, [train[i] for i in need], pad, average)
            train_ref = (torch.full((len(train),), float("nan"), dtype=torch.float64),
                         torch.full((len(train),), float("nan"), dtype=torch.float64))
            train_ref[0][need], train_ref[1][need] = c, r
    runs.log(f"reference log-probs of {len(val) + (0 if base.lora else len(need))} pairs "
             f"[{time.perf_counter() - t0:.1f}s]")

    if resumed is not None:
        st = resumed.state
        if not base.lora:
            model.load_state_dict(resumed.weights)
        restore(model, optimizer, st)
        tokens, seconds, before = st["tokens"], st["seconds"], st.get("before", {})
    else:
        before = evaluate(with_mc=True)
        runs.log(f"before training: {runs.scores_line(before)}")
    lineage = {"stage": "dpo", "base_model": str(base.path), "base_lineage": base.lineage, "data": data["source"],
               "method": "lora" if base.lora else "full", "beta": cfg.beta, "loss": cfg.loss}

    # compiled: the policy's forward and backward, and with LoRA the reference pass (adapters bypassed, no grad):
    # a second graph, compiled once; pair batches vary in length, so both are dynamic-shape graphs
    steps = budget.steps_at_least(2 * t.batch_size * t.grad_accum * seq_len)  # a step holds at most this many tokens
    maybe_compile(model, t.compile, rt.device, steps, t.max_time, runs.log, dynamic=True)
    metrics = MetricsWriter(run_dir, resume_step=step if resumed is not None else None,
                            tensorboard=t.tensorboard)
    peak = peak_flops(rt.device, amp, t.peak_flops)
    # policy forward + backward, plus a reference forward per step with LoRA (training FLOPs per token ~ 6N + 2N)
    flops_tok = flops_per_token_train(model.cfg, seq_len) * ((2 / 3 + 1 / 3) if base.lora else 1.0)
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
    with StopRequest(runs.log) as stop:
        while not done() and not stop.requested:
            t_step = time.perf_counter()
            progress = budget.progress(step, tokens, seconds)
            lr = lr_at(step, progress, t.lr, t.warmup_steps, t.schedule, t.min_lr_ratio, t.decay_fraction)
            set_lr(optimizer, lr)
            micro = [[i for row in loader.next_rows() for i in row] for _ in range(t.grad_accum)]
            n_pairs = sum(len(m) for m in micro)
            step_tokens, loss_sum = 0, 0.0
            rewards_c, rewards_r = [], []
            for idx in micro:
                if base.lora:  # the reference: this model with every adapter bypassed
                    with torch.no_grad(), autocast_ctx(), lora_disabled(model):
                        rc, rr, _ = policy_logps(model, train, idx, pad, rt.device, average)
                else:
                    rc, rr = train_ref[0][idx].to(rt.device), train_ref[1][idx].to(rt.device)
                with autocast_ctx():
                    pc, pr, n_tok = policy_logps(model, train, idx, pad, rt.device, average)
                losses, cr, rj = dpo_loss(pc, pr, rc.to(pc.dtype), rr.to(pr.dtype), cfg.beta, cfg.loss,
                                          cfg.label_smoothing)
                (losses.sum() / n_pairs).backward()  # the step's loss is the mean over all of its pairs
                loss_sum += float(losses.detach().sum())
                rewards_c.append(cr)
                rewards_r.append(rj)
                step_tokens += n_tok
            grad_norm = clip_grad_norm(model, t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            dt = time.perf_counter() - t_step
            seconds += dt
            monitor.add(step_tokens, dt)
            last = {"loss": loss_sum / n_pairs, **preference_stats(torch.cat(rewards_c), torch.cat(rewards_r))}

            record: dict = {}
            if step % t.log_every == 0 or done():
                rate = monitor.rate()
                record.update(step=step, tokens=tokens, **last, lr=lr, grad_norm=grad_norm, epoch=loader.epochs_done,
                              tokens_per_s=rate["tokens_per_s"], mfu=rate["mfu"], seconds=seconds)
            if (t.eval_every and step % t.eval_every == 0) or done():
                ev = evaluate(with_mc=done())
                record.update(step=step, tokens=tokens, **ev)
                last.update(ev)
            if record:
                metrics.write(record)
                shown = ("step", "loss", "reward_margin", "pref_accuracy", "val_loss", "val_pref_accuracy", "mc_acc")
                line = runs.record_line(record, shown)
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
    plot = plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"DPO {run_dir.name}")
    results: dict = {}
    before.pop("val_pref_accuracy", None)  # rewards are all zero before training: that accuracy means nothing yet
    for k in ("val_loss", "val_logp_accuracy", "val_pref_accuracy", "val_reward_margin", "mc_acc", "mc_acc_norm"):
        if k in before or k in last:
            results[f"{k}_base"] = before.get(k)
            results[f"{k}_finetuned"] = last.get(k)
    summary = {
        "stage": "finetune dpo", "title": f"DPO: {run_dir.name}", "status": "complete", "run_dir": str(run_dir),
        "data": {"source": data["source"], **stats.as_dict(), "train_pairs": len(train), "heldout_pairs": len(val)},
        "model": runs.model_section(base, cfg.lora),
        "training": {"steps": step, "tokens": tokens, "epochs": loader.epochs_done, "loss": cfg.loss,
                     "beta": cfg.beta, "label_smoothing": cfg.label_smoothing, "lr": t.lr,
                     "batch_size": t.batch_size, "grad_accum": t.grad_accum, "seq_len": seq_len,
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
