"""What the stage-2 recipes (sft.py, dpo.py, cpt.py) share around their loops: the start of a run (device, threads,
the run directory, the checkpoint to resume, seeds), a resumable checkpoint of a Base (whole model or LoRA
adapter), the progress line, peak memory, and the sections of summary.json every finetuning run has. The loops
themselves stay in the recipes.

Run directories (both checkpoint kinds, the damaged-checkpoint fallback, pruning, the finished-run rule, the
interrupted tail) are training/rundir.py's, as for pretraining: this module only says which kind a finetuning run
writes (LoRA: adapter checkpoints; full: model checkpoints) and how each is read back.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch

from lmforge import checkpoint as ckpt
from lmforge.errors import LmforgeError
from lmforge.finetune.weights import Base
from lmforge.training import rundir
from lmforge.training import state as tstate
from lmforge.training.distributed import Runtime


def checkpoint_kind(lora: bool) -> str:
    return rundir.ADAPTER if lora else rundir.MODEL


def _read_weights(kind: str):
    """How a checkpoint of this kind is read back: LoRA tensors in lmforge names, or a model's state dict."""
    if kind == rundir.ADAPTER:
        return lambda d: ckpt.read_adapter(d)[1]
    return lambda d: ckpt.load_model(d).state_dict()


def open_run(cfg: Any, lora: bool) -> tuple[Runtime, Path, str, rundir.Resumed | None] | None:
    """The prelude every stage-2 recipe shares: device and threads, the run directory and its config, the
    checkpoint to resume (its trainer state and weights already read, damaged ones skipped), and the seeds.
    Returns (runtime, run_dir, checkpoint kind, resumed or None), or None when this exact run already finished
    (its result is printed, as a finished run's result)."""
    from lmforge.training import distributed

    t = cfg.train
    rt = distributed.setup(t.device)
    single_device(rt, t)
    if t.threads:
        torch.set_num_threads(t.threads)
    run_dir = Path(cfg.out)
    kind = checkpoint_kind(lora)
    candidates = rundir.open_run(run_dir, cfg, kind, t.resume, log)
    if candidates is None:
        fin = rundir.final_dir(run_dir)
        print(fin if fin.exists() else rundir.adapter_dir(run_dir))
        return None
    resumed = rundir.load_newest(candidates, _read_weights(kind), log)
    tstate.seed_everything(t.seed)
    return rt, run_dir, kind, resumed


def single_device(rt: Runtime, t: Any) -> None:
    """Stage 2 trains on one device: refuse the TrainConfig options it does not implement."""
    if rt.distributed:
        raise LmforgeError("finetuning runs on one device (one process); launch it without torchrun "
                           "(multi-device data parallelism is pretrain's)")


def save_resumable(base: Base, model: Any, optimizer: Any, rt: Runtime, out: Path, trainer_state: dict,
                   lineage: dict) -> Path:
    """A checkpoint that resumes exactly: weights (or adapter), optimizer, RNG, step and data position."""
    return rundir.save_checkpoint(model, optimizer, rt, out, trainer_state=trainer_state, tokenizer=base.tokenizer,
                                  lineage=lineage, adapter_base=base.path.resolve() if base.lora else None)


def record_line(record: dict, keys: tuple[str, ...]) -> str:
    """The progress bar's text for a metrics record: the named fields, floats to 4 significant digits."""
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                    if k in keys and v is not None)


def scores_line(scores: dict) -> str:
    """Held-out scores for the log, or why there are none (never an empty line)."""
    if not scores:
        return "nothing held out to score (give --val-data FILE, or a --val-fraction above 0 with 2 or more records)"
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())


def peak_memory_bytes(device: Any) -> int:
    """Peak memory of this process: CUDA allocator peak on a GPU, else the peak resident set size."""
    if getattr(device, "type", "cpu") == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def model_section(base: Base, lora: Any) -> dict:
    from lmforge.model.accounting import n_params
    from lmforge.model.lora import split_targets

    sec = {"base": str(base.path), "parameters": n_params(base.model.cfg), "trainable_parameters": base.trainable,
           "trainable_share": base.trainable / max(1, base.total), "method": "LoRA" if base.lora else "full"}
    if base.lora:
        sec.update(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                   lora_targets=",".join(sorted(set(split_targets(lora.targets)))))
    return sec


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
