"""Weight-only int8: per-channel rounding bound, the model still predicts the same, cache works after surgery."""

import pytest
import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.inference.engine import Engine
from lmforge.inference.sampling import SamplingParams
from lmforge.model.config import preset
from lmforge.model.quantize import Int8Linear, quantize, quantize_int8, quantize_weight, weight_bytes
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
