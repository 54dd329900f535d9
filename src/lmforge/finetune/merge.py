"""`lmforge merge`: fold a LoRA adapter into its base model and write a full Hugging Face model directory.

The result loads anywhere a model directory does (lmforge, transformers, vLLM, llama.cpp's converter) with the
adapter's behaviour and the plain model's speed. The tokenizer comes from the adapter directory when it carries
one (finetuning may set a chat template), else from the base. Without --base, the adapter's
base_model_name_or_path is used when it names a local directory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import opt
from lmforge.errors import LmforgeError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class MergeConfig:
    base: str = opt("", "base model directory the adapter was trained on (default: the adapter's "
                        "base_model_name_or_path)")
    adapter: str = opt("", "PEFT LoRA adapter directory (e.g. runs/sft/adapter)")
    out: str = opt("", "directory to write the merged model to")
    dtype: str = opt("auto", "weight dtype of the merged model (auto: the base's)", choices=list(DTYPES))


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    """Load base, add the adapter, merge it, save a full HF directory at out. Returns out."""
    from lmforge import checkpoint
    from lmforge.model.lora import merge_lora

    model = checkpoint.load_model(base)
    target = model.lm_head.weight.dtype if dtype == "auto" else getattr(torch, dtype)
    model = model.float()  # add B A in fp32, then cast once
    checkpoint.load_adapter(model, adapter)
    merge_lora(model)
    model = model.to(target)
    tok_dir = adapter if (Path(adapter) / "tokenizer.json").is_file() else base
    tokenizer = checkpoint.load_tokenizer(tok_dir) if (Path(tok_dir) / "tokenizer.json").is_file() else None
    adapter_meta = checkpoint.read_lineage(adapter).get("lineage", {})
    lineage = {"stage": "merge", "base_model": str(base), "adapter": str(adapter), "adapter_lineage": adapter_meta,
               "base_lineage": checkpoint.read_lineage(base).get("lineage", {})}
    return checkpoint.save_model(model, out, tokenizer=tokenizer, lineage=lineage)


def run(cfg: MergeConfig) -> int:
    from lmforge import checkpoint

    if not cfg.adapter:
        raise LmforgeError("give the adapter directory: lmforge merge --adapter runs/sft/adapter --out runs/merged")
    if not cfg.out:
        raise LmforgeError("give an output directory: --out runs/merged")
    base = cfg.base
    if not base:
        named = checkpoint.read_adapter_config(cfg.adapter).get("base_model_name_or_path")
        if not named or not Path(named).is_dir():
            raise LmforgeError(f"the adapter names base model {named!r}, which is not a local directory; pass --base")
        base = named
    out = merge_adapter(base, cfg.adapter, cfg.out, cfg.dtype)
    print(f"merged {cfg.adapter} into {base} -> {out}", file=sys.stderr)
    print(out)
    return 0
