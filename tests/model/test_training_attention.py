"""The math attention CPU training uses under bf16 autocast (model/transformer.py: training_attention) against
float64 attention: outputs and gradients, causal and with a packed-documents mask, every head grouping; where it
applies; and that a compiled bf16 training step takes it and matches eager."""

import pytest
import torch

from lmforge.model import cpu_kernels, transformer
from lmforge.model.config import preset
from lmforge.model.transformer import Transformer, _cpu_training_attention, training_attention
from lmforge.training.compile import compile_blocks, cpu_compiler
from lmforge.training.precision import cpu_has_bf16
from lmforge.training.step import lm_loss_sum


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


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])  # lmforge's softmax kernel or torch's
@pytest.mark.parametrize("H,K", [(4, 4), (4, 2), (6, 1), (8, 4)])
@pytest.mark.parametrize("packed,T", [(False, 40), (False, 41), (True, 40)])  # causal: in two parts
def test_training_attention_matches_float64(H, K, packed, T, kernel, monkeypatch):
    if kernel and not cpu_kernels.available():
        pytest.skip("needs AVX512-VNNI and a C++ compiler")
    monkeypatch.setattr(transformer, "_softmax_kernel", lambda: kernel)
    torch.manual_seed(H * 10 + K + packed + T)
    B, D = 2, 16
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


def test_only_bf16_cpu_training_takes_the_math_attention(monkeypatch):
    """(Attention.forward asks only in training mode: evaluation keeps scaled_dot_product_attention.)"""
    q = torch.randn(2, 4, 8, 16, requires_grad=True)
    k = torch.randn(2, 2, 8, 16)
    assert not _cpu_training_attention(q, k)  # fp32: scaled_dot_product_attention
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _cpu_training_attention(q, k)
        monkeypatch.setattr(transformer, "MATH_ATTENTION_MAX_SCORES", 2 * 4 * 8 * 8 - 1)
        assert not _cpu_training_attention(q, k)  # scores too many to keep


@pytest.mark.skipif(cpu_compiler() is None or not cpu_has_bf16(), reason="needs Inductor's C++ compiler and bf16")
def test_compiled_bf16_training_step_matches_eager(monkeypatch, tmp_path):
    """The compiled blocks (training/compile.py) take the math attention under bf16 autocast too, in one graph
    each (no break around its softmax kernel), and a compiled training step's loss and gradients are eager's to
    bf16's precision."""
    monkeypatch.setenv("LMFORGE_COMPILE_CACHE", str(tmp_path / "cc"))
    calls = []
    real = transformer.training_attention

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(transformer, "training_attention", counted)
    cfg = preset("test").replace(n_layers=2, max_seq_len=64)
    torch.manual_seed(0)
    models = [Transformer(cfg) for _ in range(2)]
    models[0].init_weights(0)
    models[1].load_state_dict(models[0].state_dict())
    assert compile_blocks(models[1], torch.device("cpu"), print)
    torch._dynamo.utils.counters.clear()
    x = torch.randint(0, cfg.vocab_size, (2, 49))
    out, seen = [], []
    for m in models:
        seen.append(len(calls))
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss_sum(m, x[:, :-1], x[:, 1:]) / x[:, 1:].numel()
        loss.backward()
        out.append((loss.item(), {n: p.grad for n, p in m.named_parameters()}))
    assert seen[1] > 0 and len(calls) > seen[1], "eager and compiled blocks should both take training_attention"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    (eager, ge), (compiled, gc) = out
    assert compiled == pytest.approx(eager, rel=1e-2)
    for name, g in ge.items():
        scale = g.abs().max()
        assert (gc[name] - g).abs().max() <= 0.1 * scale, name
