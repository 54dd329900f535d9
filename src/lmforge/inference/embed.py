"""Embeddings from a decoder LM: the mean of its final (normed) hidden states over a text's tokens, unit length.

Owns: `mean_pooled(model, ids_list)` (token ids in, float32 vectors [N, C] out), as vLLM pools a causal LM
for /v1/embeddings with MEAN pooling and normalisation. Leaves to rag/embed.py the sentence encoder
(MiniLM, what retrieval uses) and to serve/ the OpenAI shape.

A decoder's states are causal (each sees only what came before), so the mean weighs the beginning of a text
more than a bidirectional encoder would: fine for similarity between texts of one model, and no match for a
trained sentence encoder on retrieval. Inputs run one by one (no padding to reason about; the cost is the
forward pass either way on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


@torch.inference_mode()
def mean_pooled(model, ids_list: Sequence[Sequence[int]]) -> np.ndarray:
    """Unit vectors [N, hidden size] for N token-id sequences (each non-empty, within the model's context)."""
    dev = next(model.parameters()).device
    out = np.zeros((len(ids_list), model.cfg.hidden_size), dtype=np.float32)
    for i, ids in enumerate(ids_list):
        hidden = model(torch.tensor([list(ids)], device=dev), return_hidden=True)[0]  # T C
        pooled = torch.nn.functional.normalize(hidden.float().mean(0), dim=-1)
        out[i] = pooled.cpu().numpy()
    return out
