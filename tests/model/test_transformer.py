"""Invariants of the model itself: KV-cache decode equals a full forward, in every cache addressing mode."""

import torch

from lmforge.model import accounting
from lmforge.model.config import PRESETS, preset
from lmforge.model.transformer import Transformer


def _model(**kw):
    torch.manual_seed(0)
    m = Transformer(preset("test").replace(**kw))
    m.init_weights(0)
    return m.eval()


def test_cache_decode_equals_full_forward():
    m = _model()
    ids = torch.randint(0, m.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 64)
        parts = [m(ids[:, :10], input_pos=0, cache=cache)]
        parts += [m(ids[:, t:t + 1], input_pos=t, cache=cache) for t in range(10, 24)]
    assert (full - torch.cat(parts, 1)).abs().max() < 1e-5


def test_per_row_positions_and_slots():
    """Rows at different lengths share one batched decode step (continuous batching)."""
    m = _model()
    a = torch.randint(0, m.cfg.vocab_size, (1, 12))
    b = torch.randint(0, m.cfg.vocab_size, (1, 7))
    with torch.no_grad():
        ref_a, ref_b = m(a), m(b)
        cache = m.new_cache(4, 32)
        m(a[:, :8], input_pos=torch.arange(8)[None], cache=cache, slots=torch.tensor([3]))
        m(b[:, :3], input_pos=torch.arange(3)[None], cache=cache, slots=torch.tensor([1]))
        pa, pb = 8, 3
        while pb < 7:
            ids = torch.tensor([[a[0, pa]], [b[0, pb]]])
            out = m(ids, input_pos=torch.tensor([[pa], [pb]]), cache=cache, slots=torch.tensor([3, 1]))
            assert (out[0, 0] - ref_a[0, pa]).abs().max() < 1e-5
            assert (out[1, 0] - ref_b[0, pb]).abs().max() < 1e-5
            pa, pb = pa + 1, pb + 1


def test_every_attention_plan_row_matches_the_full_forward():
    """One check per row of Transformer._attention_plan's table (the others: the tests around this one)."""
    for window in (None, 5):
        m = _model(sliding_window=window)
        ids = torch.randint(0, m.cfg.vocab_size, (2, 14), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            full = m(ids)
            # no cache, per-row positions
            assert (m(ids, input_pos=torch.arange(14).expand(2, 14)) - full).abs().max() < 1e-5
            # cache, contiguous: a prefill in chunks (start > 0, T > 1), then one token
            cache = m.new_cache(2, 32)
            parts = [m(ids[:, :4], input_pos=0, cache=cache), m(ids[:, 4:13], input_pos=4, cache=cache),
                     m(ids[:, 13:], input_pos=13, cache=cache)]
            assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
            # cache, row-addressed: an int start with `slots`, then per-row positions with cache_len given
            cache = m.new_cache(3, 32)
            rows = torch.tensor([2, 0])
            parts = [m(ids[:, :9], input_pos=0, cache=cache, slots=rows),
                     m(ids[:, 9:], input_pos=torch.arange(9, 14).expand(2, 5), cache=cache, slots=rows, cache_len=14)]
            assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


def test_sliding_window_masks_far_keys():
    m = _model(sliding_window=4)
    ids = torch.randint(0, m.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        full = m(ids)
        # the last token only sees the previous 4 positions, so what came before them cannot matter
        changed = ids.clone()
        changed[0, :6] = (changed[0, :6] + 1) % m.cfg.vocab_size
        assert (m(changed)[0, -1] - full[0, -1]).abs().max() > 0  # 2 layers widen the receptive field...
        cache = m.new_cache(1, 16)
        parts = [m(ids[:, :5], input_pos=0, cache=cache)]
        parts += [m(ids[:, t:t + 1], input_pos=t, cache=cache) for t in range(5, 12)]
    assert (full - torch.cat(parts, 1)).abs().max() < 1e-5  # ...but cache and full forward agree


def test_param_count_matches_accounting():
    for name in ("test", "tiny", "small"):
        cfg = PRESETS[name]
        with torch.device("meta"):
            m = Transformer(cfg)
        assert sum(p.numel() for p in m.parameters()) == accounting.n_params(cfg)


def test_named_presets_have_published_sizes():
    def n(name):
        return accounting.n_params(PRESETS[name]) / 1e9

    assert abs(n("llama-3-8b") - 8.03) < 0.05
    assert abs(n("mistral-7b") - 7.24) < 0.05
    assert abs(n("qwen2.5-0.5b") - 0.494) < 0.01
    assert abs(n("llama-2-7b") - 6.74) < 0.05
    assert abs(accounting.n_params(PRESETS["small"]) / 1e6 - 27.4) < 0.5
    assert abs(accounting.n_params(PRESETS["medium"]) / 1e6 - 82) < 1


def test_fused_projections_same_logits_and_hf_names():
    m = _model()
    ids = torch.randint(0, m.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref, before = m(ids), m.state_dict()
        m.fuse_projections()
        assert (m(ids) - ref).abs().max() < 1e-5
    attn = m.model.layers[0].self_attn
    assert hasattr(attn, "qkv_proj") and not hasattr(attn, "q_proj")
    after = m.state_dict()  # what a checkpoint of the fused model holds: Hugging Face's names, the same tensors
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_cache_grows_on_demand_keeping_what_it_holds():
    m = _model()
    ids = torch.randint(0, m.cfg.vocab_size, (2, 40))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 64, capacity=8)
        parts = [m(ids[:, :6], input_pos=0, cache=cache)]
        parts += [m(ids[:, t:t + 1], input_pos=t, cache=cache) for t in range(6, 40)]
    assert cache.capacity == 64 and cache.max_len == 64  # 8 -> 16 -> 32 -> 64, never beyond max_len
    assert (full - torch.cat(parts, 1)).abs().max() < 1e-5
    try:
        m(ids[:, :1], input_pos=64, cache=cache)
        raise AssertionError("a position beyond max_len must be refused")
    except ValueError as e:
        assert "exceeds the KV cache" in str(e)


def test_write_mask_leaves_rows_untouched():
    """Padding rows of a fixed-size decode batch write nothing, so a free slot keeps the prefix it holds."""
    m = _model()
    ids = torch.randint(0, m.cfg.vocab_size, (1, 9))
    with torch.no_grad():
        cache = m.new_cache(3, 32)
        m(ids, input_pos=0, cache=cache, slots=torch.tensor([1]))
        held = [t.clone() for t in cache.k + cache.v]
        out = m(torch.tensor([[5], [6], [7]]), input_pos=torch.tensor([[3], [2], [9]]), cache=cache,
                write_mask=torch.tensor([True, False, True]))
        assert out.shape == (3, 1, m.cfg.vocab_size)
        for before, after in zip(held, cache.k + cache.v):
            assert torch.equal(before[1], after[1])  # slot 1 as it was
            assert not torch.equal(before[0, :, 3], after[0, :, 3]) and not torch.equal(before[2, :, 9], after[2, :, 9])
