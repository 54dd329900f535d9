"""What stage 2 loads and writes: the base model (whole, or frozen under a LoRA adapter), its tokenizer and chat
template, and the outputs of a finetuning run.

Outputs of a run directory (DESIGN.md: one checkpoint format):
  full finetuning  checkpoints/step-N/ and final/ are full Hugging Face model directories.
  LoRA             checkpoints/step-N/ are PEFT adapter directories with trainer_state/ (small: only the adapter
                   and its optimizer state); at the end adapter/ is the PEFT adapter and final/ the merged full
                   model directory (unless --no-merge), so every later verb (dpo --base runs/sft/final, eval,
                   generate, serve) takes the result as it takes any model.
The tokenizer saved with the results carries the chat template the run trained with, so inference renders
prompts exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.config import opt
from lmforge.errors import LmforgeError
from lmforge.model.lora import DEFAULT_TARGETS
from lmforge.training.rundir import Resumed, adapter_dir, final_dir


@dataclass
class LoraOptions:
    enabled: bool = opt(False, "train a LoRA adapter instead of every weight (only adapter weights train and are "
                               "saved)", flag="--lora")
    rank: int = opt(16, "LoRA rank r")
    alpha: float = opt(32.0, "LoRA alpha: the update is scaled by alpha / r")
    dropout: float = opt(0.0, "dropout on the adapter's input (PEFT's default 0; each adapted projection then "
                              "keeps a dropped copy of its input for backward)")
    targets: list[str] = opt(help="projections to adapt (repeat the flag or separate with commas): q,k,v,o,gate,up,down",
                             default_factory=lambda: list(DEFAULT_TARGETS))
    merge: bool = opt(True, "also write final/ as a merged full model (the adapter is always in adapter/)")


@dataclass
class Base:
    """A loaded base: model (on device, train mode), tokenizer, chat template, where it came from."""

    model: Any
    tokenizer: Any
    template: str
    path: Path
    lineage: dict
    lora: bool
    trainable: int
    total: int
    notes: list[str] = field(default_factory=list)


def load_base(path: str, lora: LoraOptions, seed: int, device: Any, chat_template: str = "",
              resumed: Resumed | None = None, frozen_dtype: Any = None) -> Base:
    """Load the base model and tokenizer, pick the chat template, apply LoRA (or unfreeze all) and move to device.

    resumed: the checkpoint a LoRA run continues from (its adapter replaces the fresh
    initialisation). A full run loads its checkpoint's weights itself, when the recipe is ready for them (DPO first
    scores its reference with the base's own weights).
    frozen_dtype: the run's autocast dtype (None: fp32). With LoRA the frozen projections are stored in it
    (model/lora.py: lower_frozen_base): what autocast computes anyway, without casting them at every step;
    `save_final` merges into the base's full-precision weights.
    """
    from lmforge import checkpoint
    from lmforge.model.lora import (
        apply_lora,
        load_lora_state_dict,
        lower_frozen_base,
        split_targets,
        trainable_parameters,
    )
    from lmforge.tokenizer import chat

    if not path:
        raise LmforgeError("give the base model: --base runs/NAME/final (a Hugging Face model directory)")
    p = Path(path)
    if checkpoint.is_adapter_dir(p):
        raise LmforgeError(f"{p} is a LoRA adapter, not a model; pass its merged model (runs/NAME/final) or merge "
                           f"it first: lmforge merge --adapter {p} --out runs/merged")
    model = checkpoint.load_model(p, dtype=torch.float32)  # fp32 master weights; autocast does the rest
    tokenizer = checkpoint.load_tokenizer(p)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise LmforgeError(f"{p}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                           f"{model.cfg.vocab_size} embeddings; the directory mixes two models")
    notes = []
    if chat_template:
        tf = Path(chat_template)
        if not tf.is_file():
            raise LmforgeError(f"--chat-template {tf}: no such file (give a Jinja file)")
        template = tf.read_text(encoding="utf-8")
        notes.append(f"chat template from {tf}")
    elif tokenizer.chat_template:
        template = tokenizer.chat_template
    else:
        template = chat.DEFAULT_CHAT_TEMPLATE
        notes.append("the base tokenizer has no chat template; using lmforge's ChatML default (saved with the "
                     "results)")
    tokenizer.chat_template = template
    model.train()
    if lora.enabled:
        apply_lora(model, split_targets(lora.targets), rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                   seed=seed)
        if resumed is not None:
            load_lora_state_dict(model, resumed.weights, source=str(resumed.path))
        lower_frozen_base(model, frozen_dtype)
    else:
        for prm in model.parameters():
            prm.requires_grad_(True)
    trainable, total = trainable_parameters(model)
    model.to(device)
    lineage = checkpoint.read_lineage(p).get("lineage", {})
    return Base(model, tokenizer, template, p, lineage, lora.enabled, trainable, total, notes)


def save_final(base: Base, model: Any, run_dir: Path, lineage: dict, merge: bool = True) -> dict[str, str]:
    """final/ (full model) and, for LoRA, adapter/. Returns {"final": path, "adapter": path} of what was written.

    With LoRA and merge, the adapter is folded into `model` in place after adapter/ is written (no second copy of
    the weights); the merged model computes what the adapted one did.
    """
    from lmforge import checkpoint
    from lmforge.model.lora import lora_modules, merge_lora, restore_frozen_base

    out: dict[str, str] = {}
    if base.lora:
        adapter = checkpoint.save_adapter(model, adapter_dir(run_dir), base_model_name_or_path=base.path.resolve(),
                                          lineage=lineage, tokenizer=base.tokenizer)
        out["adapter"] = str(adapter)
        if merge:
            if any(m.weight.dtype != torch.float32 for _, m in lora_modules(model)):  # frozen in bf16 for training
                restore_frozen_base(model, checkpoint.load_model(base.path, dtype=torch.float32).state_dict())
            merge_lora(model)
            out["final"] = str(checkpoint.save_model(model, final_dir(run_dir), tokenizer=base.tokenizer,
                                                     lineage={**lineage, "merged_adapter": str(adapter)}))
    else:
        out["final"] = str(checkpoint.save_model(model, final_dir(run_dir), tokenizer=base.tokenizer, lineage=lineage))
    return out
