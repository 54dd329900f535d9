"""Load a model directory for inference: weights (optionally with a LoRA adapter merged, optionally int8),
its tokenizer, and every id that ends generation.

Owns: the recipe "directory -> ready-to-run model" shared by `generate`, `chat` and `serve`.
Leaves to checkpoint.py the HF format, to model/lora.py the adapter math, to model/quantize.py the int8 surgery.

Stop ids are generation_config.json's eos_token_id (int or list), plus the tokenizer's end-of-turn tokens
(<|im_end|>, <|eot_id|>, ...) that its chat template emits, so a chat reply ends at its turn's end even when a
checkpoint's generation_config names only the document EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: Any  # lmforge.model.transformer.Transformer
    tokenizer: Any | None  # lmforge.tokenizer.Tokenizer, or None if the directory has no tokenizer files
    eos_ids: list[int] = field(default_factory=list)
    adapter: Path | None = None
    quantize: str | None = None
    created: int = 0


def load(path: str | Path, *, dtype: str = "float32", quantize: str | None = None,
         adapter: str | Path | None = None, name: str | None = None) -> LoadedModel:
    """Load `path` (an HF model directory) for generation. Raises LmforgeError with what to fix."""
    import time

    import torch

    from lmforge import checkpoint
    from lmforge.model.quantize import quantize as apply_quantization

    if dtype not in DTYPES:
        raise LmforgeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    p = Path(path)
    if not p.is_dir():
        raise LmforgeError(f"model directory {p} does not exist; pass a directory written by lmforge or "
                           "save_pretrained (config.json + model.safetensors)")
    model = checkpoint.load_model(p, dtype=getattr(torch, dtype))
    if adapter is not None:
        from lmforge.model.lora import merge_lora

        checkpoint.load_adapter(model, adapter)
        merge_lora(model)  # plain weights again: adapters cost nothing per token
    model.eval().requires_grad_(False)
    apply_quantization(model, quantize)
    try:
        tokenizer = checkpoint.load_tokenizer(p)
    except LmforgeError:
        tokenizer = None  # token-id generation still works; text endpoints say what is missing
    eos = list(checkpoint.eos_ids(p))
    if tokenizer is not None:
        eos += [i for i in tokenizer.stop_ids if i not in eos]
    return LoadedModel(name=name or p.name, path=p, model=model, tokenizer=tokenizer, eos_ids=eos,
                       adapter=Path(adapter) if adapter else None, quantize=quantize, created=int(time.time()))
