"""`lmforge pretrain`: train a decoder from scratch on the token shards `lmforge prepare` wrote.

    lmforge pretrain --data data/default --preset tiny --out runs/first
    torchrun --nproc_per_node 8 $(which lmforge) pretrain --data data/big --preset small --train.parallel fsdp

`run` is the whole recipe, top to bottom: set up (process group, data, model, optimizer, resume), then one
loop: budget check -> learning rate -> micro-batches with loss.backward() -> clip -> optimizer step -> log ->
evaluate -> checkpoint. The arithmetic lives in lmforge.training (tested there); this file decides the order.

Decisions:
- The model's vocabulary is the data's tokenizer's (model.vocab_size is derived, not configured).
- Budget (training/budget.py): --max-steps, --max-tokens, --max-time; the first reached stops the run. The LR
  schedule spans the step/token budget, or the time budget when it is the only one. With none given: 500 steps.
- Resume (training/rundir.py, shared with finetuning): running the same command again (resume is on by default)
  continues from the newest checkpoint in --out that loads (damaged ones are skipped): weights, optimizer,
  schedule step, data position and RNG states, so on CPU a resumed run reproduces the uninterrupted one exactly;
  a finished run of the same config has nothing to do, and another config is refused. Ctrl-C (SIGINT) or SIGTERM
  finishes the current step, saves a checkpoint, writes the report and exits with status 130; SIGKILL at any
  moment leaves only whole checkpoints (atomic writes).
- Data parallel under torchrun: each rank reads its slice of the same global batch (see data/shards.py), so N
  ranks with batch B train like one process with batch N*B. FSDP2 with --train.parallel fsdp.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from lmforge import checkpoint as ckpt
from lmforge.config import opt, to_dict
from lmforge.data.shards import TokenLoader, TokenShards, validation_batches
from lmforge.errors import LmforgeError
from lmforge.model.config import PRESETS, ModelConfig
from lmforge.training import rundir, state
from lmforge.training.budget import Budget
from lmforge.training.compile import eager, maybe_compile
from lmforge.training.config import TrainConfig
from lmforge.training.distributed import (
    Runtime,
    all_reduce_sum,
    broadcast_object,
    cleanup,
    grad_sync,
    is_sharded,
    setup,
    unwrap,
    wrap_model,
)
from lmforge.training.evaluate import evaluate, sample
from lmforge.training.metrics import MetricsWriter, ProgressBar, plot_loss
from lmforge.training.monitor import Throughput, fastest_thread_count, peak_flops
from lmforge.training.optim import build_optimizer
from lmforge.training.precision import autocast, dtype_name, resolve_dtype
from lmforge.training.report import write_summary
from lmforge.training.schedule import lr_at, set_lr
from lmforge.training.step import clip_grad_norm, count_targets, lm_loss_sum, loss_scale
from lmforge.training.stop import StopRequest

DEFAULT_STEPS = 500  # the built-in run: ~1M tokens, about 3-4 minutes on 2 quiet CPU cores


@dataclass
class PretrainConfig:
    preset: str = opt("tiny", "model shape preset (lmforge.model.config.PRESETS); --model.KEY overrides a field",
                      preset_for="model", presets=PRESETS, choices=list(PRESETS))
    model: ModelConfig = opt(default_factory=lambda: dataclasses.replace(PRESETS["tiny"]))
    train: TrainConfig = opt(default_factory=TrainConfig)
    data: str = opt("data/default", "prepared data directory (from lmforge prepare)")
    out: str = opt("runs/pretrain", "run directory: checkpoints/, final/, metrics.jsonl, loss.png, report.md")


def _model_config(cfg: PretrainConfig, vocab_size: int, log) -> ModelConfig:
    model_cfg = dataclasses.replace(cfg.model)
    if model_cfg.vocab_size != vocab_size:
        log(f"model.vocab_size set to {vocab_size}, the data's tokenizer (was {model_cfg.vocab_size})")
        model_cfg.vocab_size = vocab_size
    model_cfg.validate()
    t = cfg.train
    if t.seq_len > model_cfg.max_seq_len:
        raise LmforgeError(f"--seq-len {t.seq_len} is longer than the model's context (model.max_seq_len "
                           f"{model_cfg.max_seq_len}); lower --seq-len or raise --model.max_seq_len")
    for name in ("batch_size", "grad_accum", "seq_len"):
        if getattr(t, name) < 1:
            raise LmforgeError(f"--train.{name} must be at least 1")
    if t.lr <= 0:
        raise LmforgeError(f"--lr must be positive, got {t.lr}")
    return model_cfg


def _same_shape(resumed: rundir.Resumed, model_cfg: ModelConfig) -> None:
    """A checkpoint resumes only into the model shape it was trained with."""
    old_d, new_d = dataclasses.asdict(resumed.weights.cfg), dataclasses.asdict(model_cfg)
    if old_d != new_d:
        diff = ", ".join(f"{k}: {old_d[k]} there, {new_d[k]} here" for k in new_d if old_d[k] != new_d[k])
        raise LmforgeError(f"the checkpoint {resumed.path} has a different model shape ({diff}); use the same "
                           "settings to resume, or another --out for a new run")


def _open(cfg: PretrainConfig, out: Path, rt: Runtime, log) -> list[Path] | None:
    """rundir.open_run on rank 0, its answer (or its error) on every rank."""
    answer: tuple = ("ok", None)
    if rt.is_main:
        try:
            answer = ("ok", rundir.open_run(out, cfg, rundir.MODEL, cfg.train.resume, log))
        except LmforgeError as e:
            answer = ("error", str(e))
    status, value = broadcast_object(answer, rt)
    if status == "error":
        raise LmforgeError(value)
    return value


def run(cfg: PretrainConfig, on_step: Callable[[int, dict], bool | None] | None = None) -> int:
    """Train; returns 0 when the budget is reached, 130 when stopped early (checkpoint saved).

    on_step(step, record) is called after every optimizer step; returning True stops the run like Ctrl-C.
    """
    t = cfg.train
    rt = setup(t.device)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rt.is_main else (lambda msg: None)
    try:
        return _run(cfg, t, rt, log, on_step)
    finally:
        cleanup()


def _run(cfg: PretrainConfig, t: TrainConfig, rt: Runtime, log, on_step) -> int:
    from lmforge.model.accounting import flops_per_token_train, n_params, param_counts
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

    out = Path(cfg.out)

    # ---- data ----------------------------------------------------------------------------------------
    train_data, val_data = TokenShards(cfg.data, "train"), TokenShards(cfg.data, "val")
    manifest = train_data.manifest
    tokenizer = Tokenizer.load(Path(cfg.data) / "tokenizer")
    model_cfg = cfg.model = _model_config(cfg, tokenizer.vocab_size, log)  # the saved config.yaml shows what ran
    loader = TokenLoader(train_data, t.seq_len, t.batch_size, t.seed, rt.rank, rt.world_size)
    tokens_per_step = t.batch_size * t.grad_accum * t.seq_len * rt.world_size
    budget = Budget.resolve(t, tokens_per_step=tokens_per_step, default_steps=DEFAULT_STEPS)
    t.max_steps = budget.max_steps  # config.yaml shows the budget that ran (DEFAULT_STEPS when none was given)

    # ---- resume or start -----------------------------------------------------------------------------
    candidates = _open(cfg, out, rt, log)
    if candidates is None:  # this run is finished
        if rt.is_main:
            print(rundir.final_dir(out))
        return 0
    if t.threads:  # after the checks above, so mistakes are reported at once
        torch.set_num_threads(t.threads)
    elif rt.device.type == "cpu" and torch.get_num_threads() > 1:
        torch.set_num_threads(fastest_thread_count())
        log(f"using {torch.get_num_threads()} CPU thread(s): the faster here right now (--train.threads N to fix)")
    state.seed_everything(t.seed)
    resumed = rundir.load_newest(candidates, lambda d: ckpt.load_model(d, dtype=torch.float32), log)
    if resumed is not None:
        _same_shape(resumed, model_cfg)
        model = resumed.weights
    else:
        model = Transformer(model_cfg)
        model.init_weights(t.seed)
    model.to(rt.device).train()
    model.activation_checkpointing = t.activation_checkpointing
    model = wrap_model(model, rt, t.parallel)
    raw = unwrap(model)  # the module itself: evaluation, sampling, the output matrix of the fused loss
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2))
    step, tokens, elapsed = 0, 0, 0.0
    if resumed is not None:
        trainer = resumed.state
        state.restore(model, optimizer, trainer)
        loader.load_state_dict(trainer["loader"])
        step, tokens, elapsed = int(trainer["step"]), int(trainer["tokens"]), float(trainer["elapsed"])
    maybe_compile(model, t.compile, rt.device, budget.horizon, t.max_time, log)

    # ---- measurement and output ----------------------------------------------------------------------
    amp = resolve_dtype(t.dtype, rt.device)
    amp_ctx = lambda: autocast(rt.device, amp)  # noqa: E731
    peak = peak_flops(rt.device, amp, t.peak_flops)
    monitor = Throughput(flops_per_token_train(model_cfg, t.seq_len), peak, rt.world_size)
    metrics = MetricsWriter(out, step if resumed else None, t.tensorboard) if rt.is_main else None
    fused = t.fused_loss and not is_sharded(model)
    counts = param_counts(model_cfg)
    log(f"model: {n_params(model_cfg) / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M non-embedding), "
        f"{model_cfg.n_layers} layers x {model_cfg.hidden_size}; data: {len(train_data):,} train tokens; "
        f"{tokens_per_step:,} tokens/step on {rt.world_size} x {rt.device.type} ({dtype_name(amp)}), "
        f"peak {peak / 1e12:.2f} TFLOP/s per device")
    bar = ProgressBar(budget.total, budget.unit, enabled=rt.is_main, start=budget.position(step, tokens, elapsed))
    lineage = {"stage": "pretrain", "data": str(cfg.data), "data_fingerprint": manifest.get("fingerprint"),
               "tokenizer_sha256": manifest["tokenizer"]["sha256"], "preset": cfg.preset}
    last: dict = {}
    val: dict = {}
    samples: list[dict] = []
    stop_reason = None

    def save_to(where: Path) -> Path:
        st = {"step": step, "tokens": tokens, "elapsed": elapsed, "loader": loader.state_dict(),
              "config": to_dict(cfg)}
        return rundir.save_checkpoint(model, optimizer, rt, where, trainer_state=st, tokenizer=tokenizer,
                                      lineage=dict(lineage, steps=step, tokens=tokens,
                                                   flops=tokens * monitor.flops_per_token))

    def run_eval() -> None:
        with eager():  # compiled blocks would recompile for evaluation's and decoding's shapes
            _eval()

    def _eval() -> None:
        nonlocal val, samples
        batches = validation_batches(val_data, t.seq_len, t.batch_size, t.eval_tokens, rt.rank, rt.world_size)
        val = evaluate(raw, batches, amp_ctx, val_data.tokens_per_byte, reduce=lambda v: all_reduce_sum(v, rt))
        samples = []
        if rt.is_main or is_sharded(model):
            prompts = [[tokenizer.eos_id], [tokenizer.eos_id] + val_data.read(0, 8).tolist()]
            for i, p in enumerate(prompts[:t.samples]):
                ids = sample(raw, p, t.sample_tokens, temperature=0.8, top_k=50, seed=t.seed + i,
                             stop_ids=[tokenizer.eos_id])
                samples.append({"prompt": tokenizer.decode(p), "text": tokenizer.decode(p[1:] + ids)})
        bpb = f", {val['bpb']:.3f} bits/byte" if val.get("bpb") else ""
        bar.print(f"step {step}: val loss {val['loss']:.4f} (ppl {val['ppl']:.1f}{bpb})")
        for s in samples:
            bar.print("  sample: " + repr(s["text"][:300]))

    # ---- the loop --------------------------------------------------------------------------------------
    with StopRequest(log) as stop, bar:
        while True:
            # budget and stop requests (agreed by all ranks, whose clocks differ)
            reason = budget.reason(step, tokens, elapsed) or ("interrupted" if stop.requested else None)
            if rt.distributed:
                agreed = all_reduce_sum([1.0 if reason else 0.0, 1.0 if stop.requested else 0.0], rt)
                if agreed[1] and not stop.requested:
                    stop.requested, reason = True, "interrupted"
                elif agreed[0] and not reason:
                    reason = "time limit reached"
            if reason:
                stop_reason = reason
                break

            t0 = time.perf_counter()
            progress = budget.progress(step, tokens, elapsed)
            lr = lr_at(step, progress, t.lr, t.warmup_steps, t.schedule, t.min_lr_ratio, t.decay_fraction)
            set_lr(optimizer, lr)

            # one optimizer step = grad_accum micro-batches; each adds its summed token loss times 1/targets
            batches = [loader.next_batch() for _ in range(t.grad_accum)]
            # every target counts in pretraining, so the global count is this rank's count times the ranks
            scale = loss_scale(sum(count_targets(y) for _, y in batches) * rt.world_size, rt.world_size)
            step_loss = torch.zeros((), device=rt.device)
            for i, (x, y) in enumerate(batches):
                x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                with grad_sync(model, i == len(batches) - 1):
                    with amp_ctx():
                        loss = lm_loss_sum(model, x, y, fused=fused, output_weight=raw.lm_head.weight) * scale
                    loss.backward()
                step_loss += loss.detach()
            grad_norm = clip_grad_norm(model, t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            step += 1
            tokens += tokens_per_step
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
            dt = time.perf_counter() - t0
            elapsed += dt
            monitor.add(tokens_per_step, dt)

            # log, evaluate, checkpoint
            at_end = budget.steps_done(step)  # not the time limit: ranks' clocks differ, and evaluation is collective
            record = None
            if step % t.log_every == 0 or at_end or step == 1:
                loss_value = all_reduce_sum([float(step_loss)], rt)[0] / rt.world_size
                record = {"step": step, "tokens": tokens, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                          "elapsed_s": round(elapsed, 3), **monitor.rate(), "epoch": round(loader.epoch, 4)}
                last = record
            if (t.eval_every and step % t.eval_every == 0) or at_end:
                run_eval()
                record = dict(record or {"step": step, "tokens": tokens}, val_loss=val["loss"],
                              val_ppl=val["ppl"], val_bpb=val["bpb"])
            if record is not None:
                if metrics:
                    metrics.write(record)
                line = None
                if "loss" in record:
                    mfu = f" mfu {record['mfu']:.1%}" if record.get("mfu") else ""
                    line = f"step {step}: loss {record['loss']:.4f} lr {lr:.2e} {record['tokens_per_s']:,.0f} tok/s{mfu}"
                bar.update(budget.position(step, tokens, elapsed), loss=last.get("loss"),
                           tokens_per_s=last.get("tokens_per_s"), line=line)
            if t.save_every and step % t.save_every == 0 and not at_end:
                rundir.save_step(out, step, save_to, t.keep_last, rundir.MODEL, rt.is_main)
            if on_step is not None and on_step(step, record or {"step": step, "loss": float(step_loss)}):
                stop.requested = True

    # ---- the end: final weights (or a checkpoint to resume from), plot, report ----------------------------
    interrupted = stop_reason == "interrupted"
    code = 0
    if interrupted:
        code = rundir.interrupted(out, step, save_to, t.keep_last, rundir.MODEL, log, rt.is_main)
        if step == 0:
            if metrics:
                metrics.close()
            return code
    else:
        if not val:
            run_eval()
        save_to(rundir.final_dir(out))
    if not rt.is_main:
        return code
    metrics.close()
    plot = plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"pretrain {out.name}")
    hours = elapsed / 3600
    summary = {
        "stage": "pretrain",
        "title": f"Pretraining report: {out.name}",
        "status": f"stopped at step {step}: interrupted; resume with the same command" if interrupted
                  else rundir.COMPLETE,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_dir": str(out),
        "data": {"directory": str(cfg.data), "sources": manifest.get("sources"),
                 "train_tokens": len(train_data), "val_tokens": len(val_data), "vocab_size": tokenizer.vocab_size,
                 "tokenizer_sha256": manifest["tokenizer"]["sha256"][:16], "epochs_seen": round(loader.epoch, 3)},
        "model": {"preset": cfg.preset, "parameters": n_params(model_cfg),
                  "non_embedding_parameters": counts["non_embedding"], "layers": model_cfg.n_layers,
                  "hidden_size": model_cfg.hidden_size, "heads": model_cfg.n_heads, "kv_heads": model_cfg.n_kv_heads,
                  "intermediate_size": model_cfg.intermediate_size, "context": model_cfg.max_seq_len,
                  "tied_embeddings": model_cfg.tie_embeddings},
        "training": {"steps": step, "stopped_by": stop_reason, "tokens": tokens, "tokens_per_step": tokens_per_step,
                     "seq_len": t.seq_len, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "ranks": rt.world_size,
                     "parallel": t.parallel if rt.distributed else "none", "peak_lr": t.lr, "schedule": t.schedule,
                     "warmup_steps": t.warmup_steps, "precision": dtype_name(amp), "device": str(rt.device),
                     "seed": t.seed},
        "compute": {"training_flops": tokens * monitor.flops_per_token, "hours": hours,
                    "device_hours": hours * rt.world_size, "tokens_per_s": tokens / elapsed if elapsed else None,
                    "mfu": monitor.mfu(tokens / elapsed) if elapsed else None, "peak_flop_s_per_device": peak},
        "results": {"final_train_loss": last.get("loss"), "final_val_loss": val.get("loss"),
                    "final_val_ppl": val.get("ppl"), "final_val_bits_per_byte": val.get("bpb")},
        "samples": samples,
        "plots": [plot.name] if plot else [],
        "artifacts": {"model": f"checkpoints/step-{step}" if interrupted else "final",
                      "metrics": "metrics.jsonl", "config": "config.yaml"},
    }
    _, report = write_summary(out, summary)
    where = rundir.step_dir(out, step) if interrupted else rundir.final_dir(out)
    log(f"{'interrupted' if interrupted else 'done'}: step {step}, {tokens:,} tokens in {elapsed / 60:.1f} min; "
        f"train loss {last.get('loss', math.nan):.4f}, val loss {val.get('loss', math.nan):.4f}")
    print(f"{where}\n{report}")
    return code
