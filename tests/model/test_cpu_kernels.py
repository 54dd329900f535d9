"""lmforge's CPU kernels (model/cpu_kernels.cpp) against plain torch arithmetic. fp32: the matmul equals float64's
for every row count (row chunks of 8 and their remainders) and tile count (groups of 4 tiles and their
remainders), and a packed linear equals nn.Linear. int4: the matmul equals the same math done
in float (activations rounded to int8 per block of 32, as the kernel does) to float rounding, for every row count
and the awkward shapes (an odd number of blocks, one block, the smallest tile); the packing round-trips; the
bfloat16 unpacking for prompts equals the weights; an Int4Linear in lmforge's packing and one in torch's agree.

Speed (2 threads, this project's EPYC, `python benchmarks/bench_decode.py --shapes small --rows int4`): see
docs/serve.md; per matrix at one row the kernel took 0.6x the time of torch's `_weight_int4pack_mm_for_cpu`."""

import pytest
import torch
from torch import nn

from lmforge.model import cpu_kernels
from lmforge.model import quantize as Q

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs AVX512-VNNI and a C++ compiler")


def packed(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 0, n)[:, None]  # rows of very different scales
    q, scale, lo = Q.quantize_int4_weight(w, 32)
    return q, scale, lo, Q.pack_q4(q, scale, lo)


def reference(x: torch.Tensor, q, scale, lo) -> torch.Tensor:
    """The kernel's math in float64: x rounded to int8 per block of 32 for the q * scale part; the min part uses
    x's exact block sums (sum_j (q_j s + m) x_j = s sum_j q_j x_j + m sum_j x_j); float16 scales and minimums."""
    m, k = x.shape
    n = q.shape[0]
    xb = x.double().reshape(m, k // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(d > 0, torch.round(xb / d), torch.zeros_like(xb)) * d
    s, mn = scale.half().double(), lo.half().double()
    wq = (q.double().reshape(n, k // 32, 32) * s[..., None]).reshape(n, k)
    return xq.reshape(m, k) @ wq.t() + xb.sum(-1) @ mn.t()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("n,k", [(2752, 512), (512, 1376), (16, 96), (32, 64), (48, 32)])
def test_matmul_equals_the_same_math_in_float(rows, n, k):
    q, scale, lo, (qw, s, mn) = packed(n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    y = cpu_kernels.q4_mm(x, qw, s, mn)
    ref = reference(x, q, scale, lo)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    assert (y.double() - ref).abs().max() <= 2e-5 * ref.abs().max()
    # bf16 activations give the same answer as their fp32 values
    assert torch.equal(cpu_kernels.q4_mm(x.bfloat16(), qw, s, mn), cpu_kernels.q4_mm(x.bfloat16().float(), qw, s, mn))


@pytest.mark.parametrize("n,k", [(2752, 512), (512, 1376), (16, 96), (16, 32)])
def test_packing_round_trips_and_unpacks_for_prompts(n, k):
    q, scale, lo, (qw, s, mn) = packed(n, k)
    assert qw.shape == (n // 16, 8 * k) and s.shape == mn.shape == (n // 16, 16 * (k // 32))
    uq, us, um = Q.unpack_q4_t(qw, s, mn, n, k)
    assert torch.equal(uq.t(), q.to(torch.uint8))
    assert torch.equal(us.t(), scale.half().float()) and torch.equal(um.t(), lo.half().float())
    w = (uq.t().float().reshape(n, k // 32, 32) * us.t()[..., None] + um.t()[..., None]).reshape(n, k)
    assert torch.equal(cpu_kernels.q4_dequant(qw, s, mn), w.bfloat16())


def test_a_zero_block_of_activations_gives_zero_not_nan():
    _, _, _, (qw, s, mn) = packed(16, 64)
    x = torch.zeros(1, 64)
    x[0, 40] = 1.0  # the first block all zeros (its int8 scale is 0)
    y = cpu_kernels.q4_mm(x, qw, s, mn)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("rows", [1, 12, 40, 520])  # the kernel (up to Q4_MAX_ROWS), then unpacking + bf16 GEMM
def test_int4_linear_packings_agree(rows, monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    ours = Q.Int4Linear(lin, 32)
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    theirs = Q.Int4Linear(lin, 32)
    assert ours.packing == "q4" and theirs.packing == "torch"
    assert (ours.dequantize() - theirs.dequantize()).abs().max() < 2e-3  # float16 vs bfloat16 scales
    x = torch.randn(rows, 256)
    a, b = ours(x), theirs(x)
    assert (a - b).abs().max() < 0.02 * b.abs().max()


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 16, 17])
@pytest.mark.parametrize("n,k", [(16, 8), (80, 96), (1024, 512), (112, 1376)])
def test_f32_matmul_equals_float64(rows, n, k):
    g = torch.Generator().manual_seed(rows * n)
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    packed = cpu_kernels.pack_f32(w)
    assert packed.shape == (n // 16, k, 16)
    y = cpu_kernels.f32_mm(x, packed)
    ref = x.double() @ w.double().t()
    assert y.shape == (rows, n) and y.dtype == torch.float32
    assert (y.double() - ref).abs().max() <= 1e-5 * k ** 0.5 * ref.abs().max()


def test_packed_f32_linear_equals_nn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    assert cpu_kernels.PackedF32Linear.fits(lin) and not cpu_kernels.PackedF32Linear.fits(nn.Linear(64, 40))
    packed = cpu_kernels.PackedF32Linear(lin)
    x = torch.randn(2, 3, 64)
    assert torch.allclose(packed(x), lin(x), atol=1e-5)
    with pytest.raises(RuntimeError, match="packed weights"):
        cpu_kernels.f32_mm(torch.randn(2, 65), packed.packed)


@pytest.mark.parametrize("heads,kv,d", [(8, 4, 64), (4, 4, 16), (14, 2, 64), (7, 1, 128)])
@pytest.mark.parametrize("rows,length", [(1, 1), (3, 37), (16, 130)])
def test_decode_attention_equals_float64(heads, kv, d, rows, length):
    """Over strided views of a larger cache (as the KV cache gives them), with masks that skip positions (a
    sliding window's hole, a row that sees only its first key)."""
    g = torch.Generator().manual_seed(heads * length + rows)
    cache_k, cache_v = torch.randn(rows + 1, kv, length + 5, d, generator=g), torch.randn(rows + 1, kv, length + 5, d, generator=g)
    k, v = cache_k[:rows, :, :length], cache_v[:rows, :, :length]
    q = torch.randn(rows, heads, d, generator=g)
    mask = torch.rand(rows, length, generator=g) < 0.7
    mask[:, 0] = True
    mask[-1, 1:] = False
    out = cpu_kernels.decode_attention(q, k, v, mask)
    qd, kd, vd = q.double().view(rows, kv, heads // kv, d), k.double(), v.double()
    s = (qd @ kd.transpose(-1, -2)) / d ** 0.5
    ref = (s.masked_fill(~mask[:, None, None], float("-inf")).softmax(-1) @ vd).reshape(rows, heads, d)
    assert (out.double() - ref).abs().max() < 1e-5


def test_decode_attention_is_what_the_model_runs_and_matches_the_matmuls(monkeypatch):
    from lmforge.model.transformer import decode_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 8, 1, 32, generator=g), torch.randn(2, 4, 50, 32, generator=g), torch.randn(2, 4, 50, 32, generator=g)
    mask = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    mask[1, ..., 20:] = False
    calls = []
    real = torch.ops.lmforge.lmforge_decode_attention
    monkeypatch.setattr(cpu_kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    ours = decode_attention(q, k, v, mask)
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    matmuls = decode_attention(q, k, v, mask)
    assert calls == [1] and torch.allclose(ours, matmuls, atol=1e-6)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.decode_attention(q.view(2, 8, 32).double(), k, v, mask.view(2, 50))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [16, 50, 8192])
def test_xent_grad_matches_float64(dtype, V):
    """Each row's loss against float64 log-softmax, and the logits overwritten by softmax - onehot (zero on ignored
    rows), in their own dtype; vocabularies that end in a partial vector too."""
    g = torch.Generator().manual_seed(V)
    x = (torch.randn(37, V, generator=g) * 4).to(dtype)
    t = torch.randint(0, V, (37,), generator=g)
    t[[3, 4, 20]] = -100
    keep = t != -100
    logp = torch.log_softmax(x.double(), -1)
    want_loss = torch.where(keep, -logp.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0)
    want_grad = logp.exp()
    want_grad[torch.arange(37)[keep], t[keep]] -= 1
    want_grad[~keep] = 0
    got = x.clone()
    loss = cpu_kernels.xent_grad_(got, t, -100)
    assert loss.dtype == torch.float32 and got.dtype == dtype
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    # the gradient is rounded once to the logits' dtype (bf16: 8 bits of mantissa)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(got.double(), want_grad.to(dtype).double(), **tol)
    assert not got[~keep].any()


def test_xent_grad_refuses_a_target_outside_the_vocabulary():
    x = torch.randn(4, 32)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        cpu_kernels.xent_grad_(x, torch.tensor([0, 1, 32, 2]), -100)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_kernels.xent_grad_(torch.randn(32, 4).t(), torch.tensor([0, 1, 2, 3]), -100)


def _softmax64(s, mask, causal, scale):
    """float64 reference: softmax(scale * s) over the allowed keys, 0 on rows that allow none."""
    T, L = s.shape[2], s.shape[3]
    allow = torch.ones(1, 1, T, L, dtype=torch.bool)
    if causal:
        allow = allow & torch.ones(T, L, dtype=torch.bool).tril(L - T)
    if mask is not None:
        allow = allow & mask[:, None]
    return torch.nan_to_num((s * scale).masked_fill(~allow, float("-inf")).softmax(-1), nan=0.0)


@pytest.mark.parametrize("B,X,T,L,causal,mask_rows", [
    (2, 3, 5, 5, True, 0),      # causal, keys fewer than a vector
    (2, 3, 7, 37, True, 0),     # the last 7 of 37 positions (the second part of training_attention's split)
    (3, 2, 17, 33, False, 3),   # a mask per batch row, keys ending in a partial vector
    (2, 4, 40, 40, True, 1),    # causal and one mask for every batch row
    (2, 2, 3, 16, False, 0),    # neither: every key
])
def test_attn_softmax_matches_float64(B, X, T, L, causal, mask_rows):
    """Probabilities and the scores' gradient against float64, each rounded once to bf16; rows that attend to
    nothing give zeros (and zero gradients), keys no row may see exactly 0."""
    g = torch.Generator().manual_seed(B * 100 + T + L)
    s = (torch.randn(B, X, T, L, generator=g) * 4).bfloat16()
    mask = None
    if mask_rows:
        mask = torch.rand(mask_rows, T, L, generator=g) > 0.3
        mask[0, 1] = False  # a query that may see nothing
    grad = torch.randn(B, X, T, L, generator=g).bfloat16()
    got = s.clone().requires_grad_()
    p = cpu_kernels.attn_softmax(got, mask, causal, 0.125)
    p.backward(grad)
    want = s.double().requires_grad_()
    ref = _softmax64(want, mask, causal, 0.125)
    ref.backward(grad.double())
    assert p.dtype == torch.bfloat16 and got.grad.dtype == torch.bfloat16
    torch.testing.assert_close(p.double(), ref, rtol=8e-3, atol=2e-3)  # bf16: 8 bits of mantissa
    assert not p.double()[ref == 0].any()
    scale = want.grad.abs().max()
    assert (got.grad.double() - torch.nan_to_num(want.grad)).abs().max() <= 1e-2 * scale


def test_attn_softmax_refuses_bad_shapes():
    s = torch.randn(1, 2, 4, 8).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16, contiguous"):
        cpu_kernels.attn_softmax(s.float(), None, True, 1.0)
    with pytest.raises(RuntimeError, match="mask"):
        cpu_kernels.attn_softmax(s, torch.ones(2, 4, 8, dtype=torch.bool), False, 1.0)  # 2 mask rows for 1
    with pytest.raises(RuntimeError, match="at least as many keys"):
        cpu_kernels.attn_softmax(torch.randn(1, 2, 8, 4).bfloat16(), None, True, 1.0)


@pytest.mark.parametrize("C", [16, 50, 512])
@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("want_dw", [True, False])
def test_rms_norm_matches_float64(C, bf16, want_dw):
    """The norm (rounded once to bf16 when asked), dx and dw against float64; widths ending in a partial vector."""
    g = torch.Generator().manual_seed(C)
    x = torch.randn(37, C, generator=g) * 3
    w = (torch.rand(C, generator=g) + 0.5).requires_grad_(want_dw)
    dy = torch.randn(37, C, generator=g).to(torch.bfloat16 if bf16 else torch.float32)
    xg = x.clone().requires_grad_()
    y = cpu_kernels.rms_norm(xg, w, 1e-5, bf16)
    assert y.dtype == (torch.bfloat16 if bf16 else torch.float32)
    y.backward(dy)
    x64, w64 = x.double().requires_grad_(), w.detach().double().requires_grad_()
    ref = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    ref.backward(dy.double())
    tol = dict(rtol=8e-3, atol=1e-5) if bf16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), ref.to(y.dtype).double(), **tol)
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    if want_dw:
        torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    else:
        assert w.grad is None


def test_rms_norm_refuses_bad_inputs():
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.rms_norm(torch.randn(4, 8).bfloat16(), torch.ones(8), 1e-5, True)
    with pytest.raises(RuntimeError, match="weight"):
        cpu_kernels.rms_norm(torch.randn(4, 8), torch.ones(9), 1e-5, True)


@pytest.mark.parametrize("n", [16, 37, 4096 + 5])
def test_swiglu_matches_float64(n):
    """silu(gate) * up and both gradients against float64, each rounded once to bf16 (large gates of both signs:
    the sigmoid must not overflow); lengths ending in a partial vector."""
    g = torch.Generator().manual_seed(n)
    gate = (torch.randn(n, generator=g) * 6).bfloat16()
    gate[:4] = torch.tensor([-100.0, 100.0, 0.0, -0.5])
    up = torch.randn(n, generator=g).bfloat16()
    dy = torch.randn(n, generator=g).bfloat16()
    got = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
    y = cpu_kernels.swiglu(*got)
    y.backward(dy)
    want = [gate.double().requires_grad_(), up.double().requires_grad_()]
    ref = torch.nn.functional.silu(want[0]) * want[1]
    ref.backward(dy.double())
    tol = dict(rtol=8e-3, atol=1e-6)  # bf16: 8 bits of mantissa
    torch.testing.assert_close(y.double(), ref.bfloat16().double(), **tol)
    for a, b in zip(got, want):
        assert a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad.double(), b.grad.bfloat16().double(), **tol)


def test_swiglu_refuses_mismatched_inputs():
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu_kernels.swiglu(torch.randn(8), torch.randn(8))
    with pytest.raises(RuntimeError, match="one shape"):
        cpu_kernels.swiglu(torch.randn(8).bfloat16(), torch.randn(9).bfloat16())


@pytest.mark.parametrize("D,rows", [(64, 1), (32, 2), (40, 1)])  # 40: halves ending in a partial vector
def test_rope_matches_float64(D, rows):
    """Queries in the heads' view of a projection ([B, T, H, D] memory, seen [B, H, T, D]) rotated as
    transformer.apply_rope does, rounded once to bf16, and its gradient; one table for every batch row or one each."""
    from lmforge.model.transformer import apply_rope

    g = torch.Generator().manual_seed(D + rows)
    B, H, T = 2, 3, 7
    x = torch.randn(B, T, H, D, generator=g).bfloat16().transpose(1, 2)
    ang = torch.rand(rows, T, D // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    dy = torch.randn(B, H, T, D, generator=g).bfloat16()
    got = x.detach().requires_grad_()
    y = cpu_kernels.rope(got, cos, sin)
    y.backward(dy)
    want = x.double().requires_grad_()
    ref = apply_rope(want, cos.double()[:, None], sin.double()[:, None])
    ref.backward(dy.double())
    assert y.dtype == torch.bfloat16 and y.is_contiguous() and got.grad.dtype == torch.bfloat16
    tol = dict(rtol=8e-3, atol=1e-2)  # rounded once to bf16 (8 bits of mantissa) from sums of two products
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(got.grad.double(), want.grad, **tol)


def test_rope_refuses_bad_tables():
    x = torch.randn(1, 2, 4, 8).bfloat16()
    with pytest.raises(RuntimeError, match="cos and sin"):
        cpu_kernels.rope(x, torch.ones(1, 5, 8), torch.ones(1, 5, 8))
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu_kernels.rope(x.float(), torch.ones(1, 4, 8), torch.ones(1, 4, 8))
