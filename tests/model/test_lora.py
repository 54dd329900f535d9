"""LoRA surgery: a fresh adapter changes nothing, merged equals unmerged, disabled equals the base, only adapter
weights train, and adapters round-trip through PEFT's own loader with the same logits (offline)."""

import json

import pytest
import torch

from lmforge import checkpoint
from lmforge.errors import LmforgeError
from lmforge.model.config import preset
from lmforge.model.lora import (
    LoRALinear,
    SharedInput,
    apply_lora,
    lora_disabled,
    lora_settings,
    lora_state_dict,
    lower_frozen_base,
    merge_lora,
    restore_frozen_base,
    split_targets,
    trainable_parameters,
)
from lmforge.model.transformer import Transformer
from tests.conftest import make_hf_model
from tests.finetune.fixtures import one_thread  # noqa: F401  (autouse: torch on one thread)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = Transformer(preset("test").replace(**kw))
    m.init_weights(seed)
    return m


def _randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


IDS = torch.randint(0, 2048, (2, 11), generator=torch.Generator().manual_seed(0))


def test_fresh_adapter_is_identity_then_merge_equals_unmerged():
    model = _model(qkv_bias=True).eval()
    with torch.no_grad():
        base = model(IDS)
    names = apply_lora(model, rank=4, alpha=8, seed=0)
    assert len(names) == 2 * 7 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    with torch.no_grad():
        assert torch.equal(model(IDS), base)  # B = 0
    _randomize_b(model)
    with torch.no_grad():
        adapted = model(IDS)
        with lora_disabled(model):
            assert torch.allclose(model(IDS), base, atol=1e-6)
        assert (adapted - base).abs().max() > 1e-3
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert torch.allclose(model(IDS), adapted, atol=1e-5)
    assert set(model.state_dict()) == set(_model(qkv_bias=True).state_dict())


def test_only_adapter_weights_train():
    model = _model(tie_embeddings=True)
    apply_lora(model, targets=["q", "v"], rank=2, alpha=4, dropout=0.1, seed=0)
    trainable, total = trainable_parameters(model)
    assert trainable == 2 * 2 * ((128 + 128) + (128 + 64)) and total > trainable
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(IDS).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any(k.endswith("lora_A") for k in changed)
    s = lora_settings(model)
    assert s["targets"] == ["q_proj", "v_proj"] and s["rank"] == 2 and s["dropout"] == 0.1
    assert set(lora_state_dict(model)) == {k for k in after if ".lora_" in k}


def test_frozen_base_in_bf16_computes_what_autocast_did_and_merges_at_full_precision():
    model = _model(qkv_bias=True)
    apply_lora(model, rank=4, alpha=8, seed=0)
    _randomize_b(model)
    fp32_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(IDS)
        loss = before.float().logsumexp(-1).mean()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    assert lower_frozen_base(model, torch.bfloat16) == 2 * 7 + 2 * 3  # 14 weights and the q/k/v biases
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32  # the adapter still trains in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(IDS)
        loss2 = after.float().logsumexp(-1).mean()
    grads2 = torch.autograd.grad(loss2, [p for p in model.parameters() if p.requires_grad])
    assert torch.equal(before, after)  # autocast rounded the fp32 weights to these very bf16 values
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
    with torch.no_grad():  # outside autocast the lowered base still runs (in bf16)
        assert (model(IDS) - before.float()).abs().max() < 0.1
    assert restore_frozen_base(model, fp32_state) == 20
    merge_lora(model)
    with torch.no_grad():
        merged = model(IDS)
    reference = _model(qkv_bias=True)
    apply_lora(reference, rank=4, alpha=8, seed=0)
    _randomize_b(reference)
    merge_lora(reference)
    with torch.no_grad():
        assert torch.equal(merged, reference(IDS))  # merged into the fp32 weights, not the bf16 copies


def test_shared_input_adapters_compute_what_separate_ones_do():
    grouped, separate = _model(), _model()
    apply_lora(grouped, rank=4, alpha=8, seed=0)
    apply_lora(separate, rank=4, alpha=8, seed=0)
    attn = grouped.model.layers[0].self_attn
    assert isinstance(attn.q_proj.shared, SharedInput) and attn.q_proj.shared is attn.v_proj.shared
    assert grouped.model.layers[0].mlp.gate_proj.shared.members[1] is grouped.model.layers[0].mlp.up_proj
    assert grouped.model.layers[0].mlp.down_proj.shared is None  # reads its own input
    for _, m in separate.named_modules():
        if isinstance(m, LoRALinear):
            m.shared = None
    _randomize_b(grouped)
    _randomize_b(separate)
    outs, grads = [], []
    for model in (grouped, separate):
        out = model(IDS)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().mean(), [p for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert attn.q_proj.shared.x is None  # the forward left no activation behind
    # dropout: each projection draws its own mask, as PEFT does, so nothing is shared
    drop = _model()
    apply_lora(drop, rank=4, dropout=0.1)
    assert drop.model.layers[0].self_attn.q_proj.shared is None


def test_targets_as_the_command_line_gives_them():
    assert split_targets(["q,v", " o ", "gate,,up"]) == ["q", "v", "o", "gate", "up"]
    assert split_targets(["q_proj"]) == ["q_proj"] and split_targets([]) == []


def test_bad_targets_and_rank_are_clear_errors():
    with pytest.raises(LmforgeError, match="unknown LoRA target"):
        apply_lora(_model(), targets=["qq"])
    with pytest.raises(LmforgeError, match="rank"):
        apply_lora(_model(), rank=0)
    model = _model()
    apply_lora(model, targets=["q"])
    with pytest.raises(LmforgeError, match="already has a LoRA"):
        apply_lora(model, targets=["q"])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_adapter_loads_in_peft_with_same_logits(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    make_hf_model(family, base_dir)
    model = checkpoint.load_model(base_dir)
    apply_lora(model, targets=["q", "k", "v", "o", "gate", "up", "down"], rank=4, alpha=16, seed=0)
    _randomize_b(model)
    adapter = checkpoint.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=base_dir)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir) and cfg["r"] == 4
    ids = torch.randint(3, 256, (2, 13), generator=torch.Generator().manual_seed(2))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    with torch.no_grad():
        ours = model(ids)
        theirs = peft_model(ids).logits
    assert (ours - theirs).abs().max() < 1e-4

    # the reverse: lmforge loads the adapter (here the one PEFT just read) onto a fresh base
    fresh = checkpoint.load_adapter(checkpoint.load_model(base_dir), adapter)
    with torch.no_grad():
        assert (fresh(ids) - theirs).abs().max() < 1e-4
        # merge -> a plain HF directory that transformers loads with the adapted logits
        merge_lora(fresh)
    checkpoint.save_model(fresh, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(ids).logits - theirs).abs().max() < 1e-4


def test_peft_written_adapter_loads_into_lmforge(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    make_hf_model("llama", base_dir)
    hf = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(hf, LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"],
                                               use_rslora=True))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    model = checkpoint.load_adapter(checkpoint.load_model(base_dir), tmp_path / "peft")
    assert lora_settings(model)["targets"] == ["q_proj", "down_proj"]
    with torch.no_grad():
        assert (model(ids) - peft_model.eval()(ids).logits).abs().max() < 1e-4


def test_adapter_dir_errors(tmp_path):
    model = _model()
    with pytest.raises(LmforgeError, match="does not exist"):
        checkpoint.load_adapter(model, tmp_path / "nope")
    d = tmp_path / "dora"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True}))
    with pytest.raises(LmforgeError, match="use_dora"):
        checkpoint.load_adapter(model, d)


def test_huge_rank_or_nan_alpha_in_apply_lora_are_clear_errors():
    """Before any factor is allocated: a rank that cannot fit, and an alpha that would make every output NaN."""
    with pytest.raises(LmforgeError, match=r"LoRA rank 1000000000000 on 4 projections needs .* free; use a smaller rank"):
        apply_lora(_model(), targets=["q", "v"], rank=10**12)
    for alpha in (float("nan"), float("inf"), -1.0):
        with pytest.raises(LmforgeError, match="alpha must be a finite positive number"):
            apply_lora(_model(), alpha=alpha)


def _set(**kw):
    return lambda c: c.update(kw)


# Hostile adapter_config.json files beside real adapter weights (rank 4 on q,v of the "test" preset, 2 layers)
ADAPTER_BANK = [
    ("r-huge", _set(r=10**9), r"r is 1000000000, but .* holds .* of shape \(4, 128\)"),
    ("r-beyond-int32", _set(r=2**40), "'r' .* must be a positive integer"),
    ("r-0", _set(r=0), "'r' .* must be a positive integer"),
    ("r-negative", _set(r=-4), "'r' .* must be a positive integer"),
    ("r-string", _set(r="4"), "'r' .* must be a positive integer"),
    ("r-float", _set(r=4.0), "'r' .* must be a positive integer"),
    ("r-bool", _set(r=True), "'r' .* must be a positive integer"),
    ("r-smaller-than-tensors", _set(r=2), r"r is 2, but .* of shape \(4, 128\)"),
    ("alpha-nan", _set(lora_alpha=float("nan")), "lora_alpha must be a finite positive number"),
    ("alpha-inf", _set(lora_alpha=float("inf")), "lora_alpha must be a finite positive number"),
    ("alpha-negative", _set(lora_alpha=-16), "lora_alpha must be a finite positive number"),
    ("alpha-0", _set(lora_alpha=0), "lora_alpha must be a finite positive number"),
    ("alpha-string", _set(lora_alpha="16"), "lora_alpha must be a finite positive number"),
    ("dropout-1.5", _set(lora_dropout=1.5), r"lora_dropout must be a number in \[0, 1\)"),
    ("targets-unknown", _set(target_modules=["q_proj", "embed_tokens"]), r"target module\(s\) \['embed_tokens'\] are not"),
    ("targets-number", _set(target_modules=5), "target_modules must be a list of module names"),
    ("targets-bad-regex", _set(target_modules="(q_proj"), "not a valid regular expression"),
    ("layers-beyond-base", _set(layers_to_transform=[0, 7]), "names layer 7, but the base model has 2 layers"),
    ("layers-negative", _set(layers_to_transform=[-1]), "layers_to_transform must be null, a layer index"),
    ("layers-string", _set(layers_to_transform="0"), "layers_to_transform must be null, a layer index"),
    ("rslora-string", _set(use_rslora="yes"), "use_rslora must be true or false"),
    ("json-list", "[4, 8]", "must hold a JSON object"),
    ("peft-type", _set(peft_type="IA3"), "peft_type 'IA3' is not supported"),
]


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    model = _model()
    apply_lora(model, targets=["q", "v"], rank=4, alpha=8)
    return checkpoint.save_adapter(model, tmp_path_factory.mktemp("adapter") / "a")


@pytest.mark.parametrize("change, message", [c[1:] for c in ADAPTER_BANK], ids=[c[0] for c in ADAPTER_BANK])
def test_hostile_adapter_config_is_one_clear_error(saved_adapter, tmp_path, change, message):
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_model.safetensors").symlink_to(saved_adapter / "adapter_model.safetensors")
    if isinstance(change, str):
        (d / "adapter_config.json").write_text(change)
    else:
        cfg = json.loads((saved_adapter / "adapter_config.json").read_text())
        change(cfg)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    model = _model()
    with pytest.raises(LmforgeError, match=message) as e:
        checkpoint.load_adapter(model, d)
    assert "adapter_config.json" in str(e.value)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # refused before any surgery


def test_the_saved_adapter_loads(saved_adapter):
    model = checkpoint.load_adapter(_model(), saved_adapter)
    assert lora_settings(model)["rank"] == 4
