"""Weight-only int8: per-channel rounding bound, the model still predicts the same, cache works after surgery."""

import pytest
import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.inference.engine import Engine
from lmforge.inference.sampling import SamplingParams
from lmforge.model.config import preset
from lmforge.model.quantize import (
    Int4Linear,
    Int8Linear,
    quantize,
    quantize_int8,
    quantize_weight,
    unpack_int4_t,
    weight_bytes,
)
from lmforge.model.transformer import Transformer


def test_per_channel_rounding_error_is_half_a_step():
    w = torch.randn(64, 32) * torch.logspace(-3, 0, 64)[:, None]  # very different row scales
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * s[:, None] - w).abs().amax(1)
    assert (err <= s / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 3, 40])  # fused kernel (few rows) and dequantize path (many)
def test_int8_linear_matches_dequantized_weights(rows):
    lin = nn.Linear(96, 80, bias=True)
    q = Int8Linear(lin)
    x = torch.randn(rows, 96)
    ref = x @ q.dequantize().T + lin.bias
    out = q(x)
    assert out.shape == (rows, 80) and out.dtype == x.dtype
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()  # bf16 activations in the fast path


def test_quantized_model_keeps_predictions_and_shrinks():
    torch.manual_seed(0)
    m = Transformer(preset("test"))
    m.init_weights(0)
    m.eval()
    ids = torch.randint(0, m.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        ref = m(ids)
        before = weight_bytes(m)
        quantize_int8(m)
        out = m(ids)
    assert isinstance(m.model.layers[0].self_attn.q_proj, Int8Linear) and isinstance(m.lm_head, Int8Linear)
    assert weight_bytes(m) < 0.6 * before  # embeddings stay fp32 (tied table), projections 1 byte
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > 0.9
    # the engine runs the quantized model, cache and all
    out_ids = Engine(m, max_batch=2).generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0.0, max_tokens=5))
    assert [len(o) for o in out_ids] == [5, 5]
    with pytest.raises(LmforgeError, match="no nn.Linear"):
        quantize_int8(m)
    with pytest.raises(LmforgeError, match="int8"):
        quantize(m, "int3")


@pytest.mark.parametrize("n", [64, 96, 128, 176, 16])  # whole 64-row blocks, and the tail layout
def test_int4_unpack_inverts_torch_packing(n):
    q = torch.randint(0, 16, (n, 64), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(unpack_int4_t(packed, n, 64).t(), q.to(torch.uint8))


@pytest.mark.parametrize("rows", [1, 40, 200])  # the int4 kernel (up to 128 rows), then dequantize + bf16 GEMM
def test_int4_linear_matches_its_dequantized_weights(rows):
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True)
    q = Int4Linear(lin, group_size=32)
    w = q.dequantize()
    step = (lin.weight.reshape(96, 4, 32).amax(-1) - lin.weight.reshape(96, 4, 32).amin(-1)) / 15
    assert ((w - lin.weight).abs().reshape(96, 4, 32).amax(-1) <= step / 2 + 2e-3).all()  # half a step (+ bf16)
    x = torch.randn(rows, 128)
    ref = x @ w.T + lin.bias
    out = q(x)
    assert out.shape == (rows, 96) and out.dtype == x.dtype
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()  # bf16 activations


def test_int4_model_covers_every_projection_and_the_head():
    torch.manual_seed(0)
    m = Transformer(preset("test").replace(intermediate_size=384, tie_embeddings=True))
    m.init_weights(0)
    m.eval()
    ids = torch.randint(0, m.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = m(ids)
        m.fuse_projections()
        before = weight_bytes(m)
        quantize(m, "int4")
        out = m(ids)
    kinds = {type(mod).__name__ for name, mod in m.named_modules() if name.endswith(("_proj", "lm_head"))}
    assert kinds == {"Int4Linear"}  # qkv_proj, o_proj, gate_up_proj, down_proj and the (tied) head
    assert m.model.embed_tokens.weight.dtype == torch.float32  # the lookup table stays as it was
    table = m.model.embed_tokens.weight.numel() * 4
    # every matrix (the head's own copy of the tied table included) at 0.5 byte a weight + bf16 scale and min per 32
    assert weight_bytes(m) - table < 0.2 * before
    # the logit error is bounded (4 bits at groups of 32: ~6% of the largest logit, ~12% in norm, measured here)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() and (out - ref).norm() < 0.2 * ref.norm()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.6  # random weights: small logit gaps
    outs = Engine(m, max_batch=2).generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0.0, max_tokens=5))
    assert [len(o) for o in outs] == [5, 5]


def test_int4_falls_back_to_int8_where_the_kernel_cannot():
    torch.manual_seed(0)
    m = Transformer(preset("test"))  # intermediate 344: no multiple of 16, in or out
    quantize(m, "int4")
    assert isinstance(m.model.layers[0].mlp.down_proj, Int8Linear)
    assert isinstance(m.model.layers[0].mlp.up_proj, Int8Linear)
    assert isinstance(m.model.layers[0].self_attn.q_proj, Int4Linear)
    with pytest.raises(LmforgeError, match="group size"):
        quantize(Transformer(preset("test")), "int4", group_size=48)
