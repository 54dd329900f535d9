"""Loss normalisation under accumulation, the fused linear cross-entropy, clipping, optimizer groups, schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.data import IGNORE_INDEX
from lmforge.model import cpu_kernels
from lmforge.model.config import preset
from lmforge.model.transformer import Transformer
from lmforge.training import step
from lmforge.training.optim import build_optimizer, param_groups
from lmforge.training.schedule import lr_at, step_progress
from lmforge.training.step import (
    clip_grad_norm,
    count_targets,
    cross_entropy_sum,
    linear_cross_entropy,
    lm_loss_sum,
    loss_scale,
)


def _model(seed=0):
    torch.manual_seed(seed)
    m = Transformer(preset("test").replace(n_layers=1))
    m.init_weights(seed)
    return m


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused", [True, False])
def test_accumulation_8x1_equals_1x8_with_uneven_masks(fused):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2048, (8, 16), generator=g)
    y = torch.randint(0, 2048, (8, 16), generator=g)
    y[0, :12] = IGNORE_INDEX  # micro-batches with very different numbers of targets
    y[3, 2:] = IGNORE_INDEX
    y[5, :] = IGNORE_INDEX
    m = _model()
    total = count_targets(y)
    (lm_loss_sum(m, x, y, fused=fused) * loss_scale(total)).backward()
    big = _grads(m)
    # the reference: the plain mean over all target tokens of the batch
    m.zero_grad()
    ref = F.cross_entropy(m(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    ref.backward()
    for n, gr in _grads(m).items():
        torch.testing.assert_close(big[n], gr, rtol=1e-4, atol=1e-6)
    m.zero_grad()
    acc = 0.0
    for i in range(8):
        loss = lm_loss_sum(m, x[i:i + 1], y[i:i + 1], fused=fused) * loss_scale(total)
        loss.backward()
        acc += float(loss.detach())
    assert acc == pytest.approx(float(ref.detach()), rel=1e-5)
    for n, gr in _grads(m).items():
        torch.testing.assert_close(big[n], gr, rtol=1e-4, atol=1e-6)


def test_loss_scale_undoes_data_parallel_averaging():
    # two ranks with 3 and 9 targets: DDP averages their gradients, the scale must make it the global mean
    sums, counts = [torch.tensor(6.0), torch.tensor(36.0)], [3, 9]
    scaled = [s * loss_scale(sum(counts), world_size=2) for s in sums]
    assert float(sum(scaled) / 2) == pytest.approx(42.0 / 12)
    with pytest.raises(ValueError):
        loss_scale(0)


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_matches_reference(dtype, kernel, monkeypatch):
    if kernel and not cpu_kernels.available():
        pytest.skip("lmforge's CPU kernels need AVX512 and a C++ compiler")
    if not kernel:
        monkeypatch.setattr(step, "_fused_kernel", lambda h, w: False)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 37, 24, generator=g, requires_grad=True)
    w = torch.randn(50, 24, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (2, 37), generator=g)
    t[1, 5:9] = IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ref = cross_entropy_sum(h @ w.t(), t)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = linear_cross_entropy(h, w, t, chunk=10)
    (out * 0.5).backward()  # a non-unit upstream gradient
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(h.grad, gh * 0.5, **tol)
    torch.testing.assert_close(w.grad, gw * 0.5, **tol)


def test_clip_grad_norm_reports_and_clips():
    m = _model()
    x = torch.randint(0, 2048, (2, 8))
    (lm_loss_sum(m, x, x) * 10).backward()
    norm = clip_grad_norm(m, 0.5)
    after = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in m.parameters() if p.grad is not None))
    assert norm > 0.5 and after == pytest.approx(0.5, rel=1e-4)
    assert clip_grad_norm(m, 0.0) == pytest.approx(after, rel=1e-4)  # 0: measure only


def test_weight_decay_on_matrices_only():
    m = _model()
    m.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    groups = param_groups(m, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    for n, p in m.named_parameters():
        if not p.requires_grad:
            assert id(p) not in decayed and all(id(p) != id(q) for q in groups[1]["params"])
        elif p.dim() >= 2:
            assert id(p) in decayed, n
        else:
            assert id(p) not in decayed, n
    opt = build_optimizer(m, 1e-3, 0.1)
    assert isinstance(opt, torch.optim.AdamW)


def test_schedules():
    kw = dict(base_lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 0.0, **kw) == pytest.approx(0.1)
    assert lr_at(9, 0.0, **kw) == pytest.approx(1.0)
    assert lr_at(10, step_progress(10, 110, 10), **kw) == pytest.approx(1.0)
    assert lr_at(60, step_progress(60, 110, 10), **kw) == pytest.approx(0.55)
    assert lr_at(110, step_progress(110, 110, 10), **kw) == pytest.approx(0.1)
    lrs = [lr_at(s, step_progress(s, 110, 10), **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    wsd = dict(kw, kind="wsd", decay_fraction=0.2)
    assert lr_at(50, 0.5, **wsd) == 1.0 and lr_at(50, 0.9, **wsd) == pytest.approx(0.55)
    assert lr_at(50, 1.0, **wsd) == pytest.approx(0.1)
    assert lr_at(50, 0.9, **dict(kw, kind="constant")) == 1.0
    with pytest.raises(ValueError):
        lr_at(0, 0.0, 1.0, kind="linear")


def test_fused_loss_backward_runs_once():
    """Its gradients are scaled in place by the first backward: a second one through a retained graph raises
    rather than scaling them twice."""
    h, w = torch.randn(10, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.randint(0, 16, (10,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
