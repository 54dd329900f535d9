"""The optimizer: AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only.

Parameter groups follow GPT-2/nanoGPT: every parameter with two or more dimensions (linear weights and the
embedding table) decays; vectors (RMSNorm gains, biases) do not, because shrinking a gain or a bias towards
zero is not regularisation. Only parameters with requires_grad are optimised, so the same function serves
full training and LoRA. On CUDA the fused kernel is used; elsewhere torch's foreach implementation.
"""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[decayed matrices, undecayed vectors]; tied parameters appear once."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over param_groups(model); fused on CUDA."""
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    fusable = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params) and \
        len({p.device.type for p in params}) == 1
    kwargs = {"fused": True} if fusable else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)
