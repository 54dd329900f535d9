"""The math attention compiled CPU training uses under bf16 autocast (model/transformer.py: training_attention)
against float64 attention: outputs and gradients, causal and with a packed-documents mask, every head grouping;
and that compiled bf16 training takes it only where it should."""

import pytest
import torch

from lmforge.model.transformer import _compiled_cpu_training, training_attention


def reference(q, k, v, mask):
    """float64 attention of q [B, H, T, D] over k, v [B, K, L, D], mask [B or 1, 1, T, L] (True = attend)."""
    H, K = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def packed_mask(B, T, cuts):
    """Block-diagonal causal mask of documents that start at `cuts` (positions restart per document)."""
    doc = torch.zeros(T, dtype=torch.long)
    for c in cuts:
        doc[c:] += 1
    same = doc[:, None] == doc[None, :]
    return (same & torch.ones(T, T, dtype=torch.bool).tril())[None, None].expand(B, 1, T, T)


@pytest.mark.parametrize("H,K", [(4, 4), (4, 2), (6, 1), (8, 4)])
@pytest.mark.parametrize("packed", [False, True])
def test_training_attention_matches_float64(H, K, packed):
    torch.manual_seed(H * 10 + K + packed)
    B, T, D = 2, 40, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, K, T, D), torch.randn(B, K, T, D)
    g = torch.randn(B, H, T, D)
    mask = packed_mask(B, T, [13, 29]) if packed else torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    want = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference(*want, mask)
    ref.backward(g.double())
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = training_attention(*got, None if not packed else mask, is_causal=not packed)
    assert y.dtype == torch.bfloat16
    y.float().backward(g)
    # bf16 matmul inputs (8 bits of mantissa): errors of a few parts in a hundred of the values' scale
    assert (y.double() - ref).abs().max() < 0.05
    for a, b in zip(got, want):
        scale = b.grad.abs().max()
        assert (a.grad.double() - b.grad).abs().max() < 0.05 * scale


def test_only_compiled_bf16_cpu_training_takes_the_math_attention():
    q = torch.randn(1, 4, 8, 16, requires_grad=True)
    k = torch.randn(1, 2, 8, 16)
    assert not _compiled_cpu_training(q, k)  # eager
    seen = []

    @torch.compile(backend="eager", fullgraph=True)
    def probe(q, k):
        seen.append(_compiled_cpu_training(q, k))
        return q.sum()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe(q, k)
    probe(q.detach().clone().requires_grad_(), k)  # fp32: flash attention as before
    assert seen == [True, False]
