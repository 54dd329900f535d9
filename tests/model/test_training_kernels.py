"""lmforge's eager CPU training kernels in the model (cpu_kernels.cpp sections 5-8: attention's softmax, RMSNorm,
SwiGLU, RoPE): a bf16-autocast training step takes each of them and gives the loss and gradients of torch's ops,
for a packed-documents mask and per-row positions too."""

import pytest
import torch

from lmforge.model import cpu_kernels, transformer
from lmforge.model.config import preset
from lmforge.model.transformer import Transformer
from lmforge.training.step import lm_loss_sum

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs AVX512-VNNI and a C++ compiler")

KERNELS = ("_softmax_kernel", "_norm_kernel", "_swiglu_kernel", "_rope_kernel")


def step(model, x, **kw):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss_sum(model, x[:, :-1], x[:, 1:], **kw) / x[:, 1:].numel()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
def test_training_kernels_match_torch_ops(monkeypatch, packed):
    cfg = preset("test").replace(n_layers=2, max_seq_len=64)
    model = Transformer(cfg)
    model.init_weights(0)
    model.train()
    x = torch.randint(0, cfg.vocab_size, (2, 41), generator=torch.Generator().manual_seed(1))
    kw = {}
    if packed:  # two documents a row, positions restarting at each
        doc = (torch.arange(40) >= 17).long()
        kw["mask"] = ((doc[:, None] == doc[None, :]) & torch.ones(40, 40, dtype=torch.bool).tril())[None, None]
        kw["input_pos"] = torch.cat([torch.arange(17), torch.arange(23)])[None].expand(2, 40)

    calls = {name: 0 for name in KERNELS}
    for name in KERNELS:
        real = getattr(transformer, name)

        def counted(*args, _real=real, _name=name):
            took = _real(*args)
            calls[_name] += took
            return took

        monkeypatch.setattr(transformer, name, counted)
    with_kernels = step(model, x, **kw)
    assert all(calls.values()), calls  # each kernel took its part

    for name in KERNELS:
        monkeypatch.setattr(transformer, name, lambda *args: False)
    with_torch = step(model, x, **kw)

    assert with_kernels[0] == pytest.approx(with_torch[0], rel=5e-3)
    for name, g in with_torch[1].items():
        # each side rounds to bf16 in different places (the kernels once per fused op): a few parts in a hundred
        assert (with_kernels[1][name] - g).abs().max() <= 0.05 * g.abs().max(), name
