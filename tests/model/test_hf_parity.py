"""lmforge's Transformer, loaded through the production checkpoint code, matches transformers exactly."""

import pytest
import torch

from lmforge import checkpoint
from tests.conftest import make_hf_model


def _ids(vocab, shape=(2, 17), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, shape, generator=g)


def test_logits_match_transformers(hf_model):
    family, path, ref = hf_model
    model = checkpoint.load_model(path)
    assert model.cfg.model_type == family
    ids = _ids(model.cfg.vocab_size)
    with torch.no_grad():
        ours = model(ids)
        theirs = ref(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_greedy_generation_matches_transformers(hf_model):
    _, path, ref = hf_model
    model = checkpoint.load_model(path)
    prompt = _ids(model.cfg.vocab_size, (1, 9), seed=1)
    new = 12
    theirs = ref.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 9:]
    with torch.no_grad():
        # without a KV cache: full forward each step
        seq = prompt
        for _ in range(new):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        assert seq[0, 9:].tolist() == theirs.tolist()
        # with the KV cache: prefill then one token at a time
        cache = model.new_cache(1, 64)
        logits = model(prompt, input_pos=0, cache=cache)
        out = []
        pos = prompt.shape[1]
        for _ in range(new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt.item())
            logits = model(nxt, input_pos=pos, cache=cache)
            pos += 1
    assert out == theirs.tolist()


@pytest.mark.parametrize("tie", [False, True])
def test_saved_model_loads_in_transformers(tmp_path, tie):
    import transformers

    make_hf_model("llama", tmp_path / "src", tie=tie)
    model = checkpoint.load_model(tmp_path / "src")
    checkpoint.save_model(model, tmp_path / "out", lineage={"base": "test"})
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids(model.cfg.vocab_size)
    with torch.no_grad():
        assert (model(ids) - again(ids).logits).abs().max().item() < 1e-4
    assert checkpoint.read_lineage(tmp_path / "out")["lineage"]["base"] == "test"


def test_sharded_checkpoint_loads(tmp_path):
    ref = make_hf_model("qwen2", tmp_path / "m")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = checkpoint.load_model(tmp_path / "sharded")
    ids = _ids(model.cfg.vocab_size)
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() < 1e-4


def test_llama31_rope_scaling_matches(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    ref = make_hf_model("llama", tmp_path / "m", rope_scaling=scaling, max_position_embeddings=512)
    model = checkpoint.load_model(tmp_path / "m")
    assert model.cfg.rope_scaling["rope_type"] == "llama3"
    ids = _ids(model.cfg.vocab_size, (1, 100))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("family, scaling", [
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ("llama", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16,
               "beta_slow": 2, "truncate": False}),
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "attention_factor": 1.3}),
    ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0,
               "mscale_all_dim": 0.5}),
    ("qwen2", {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32}),  # factor = 128 / 32
])
def test_yarn_rope_scaling_matches(tmp_path, family, scaling):
    """YaRN (Qwen2.5's long-context setting) as transformers computes it: frequencies and the cos/sin factor."""
    ref = make_hf_model(family, tmp_path / "m", rope_scaling=scaling, max_position_embeddings=128)
    model = checkpoint.load_model(tmp_path / "m")
    assert model.cfg.rope_scaling["rope_type"] == "yarn"
    assert model.rope_scale == pytest.approx(ref.model.rotary_emb.attention_scaling, rel=1e-6)
    assert model.rope_scale != 1.0
    assert (model.inv_freq - ref.model.rotary_emb.inv_freq).abs().max() < 1e-6
    ids = _ids(model.cfg.vocab_size, (1, 100))  # beyond the original context
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() < 1e-4
        cache = model.new_cache(1, 128)  # the cache path uses the same scaled rotary
        parts = [model(ids[:, :60], input_pos=0, cache=cache)]
        parts += [model(ids[:, t:t + 1], input_pos=t, cache=cache) for t in range(60, 100)]
        assert (torch.cat(parts, 1) - ref(ids).logits).abs().max().item() < 1e-4


def test_lmforge_model_with_tokenizer_round_trips_through_transformers(tmp_path):
    """A model lmforge trains and saves is a HF directory: same logits, same ids, same chat string."""
    import json

    import transformers

    from lmforge.model.config import preset
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import train_bpe

    text = ["def add(a, b):\n    return a + b\n", "Tokenizers split text into pieces. Ünïcödé ✓ 你好 🙂"] * 40
    tok = train_bpe(iter(text), vocab_size=300)
    model = Transformer(preset("test").replace(vocab_size=tok.vocab_size))
    model.init_weights(0)
    checkpoint.save_model(model.eval(), tmp_path / "m", tokenizer=tok)
    assert checkpoint.eos_ids(tmp_path / "m") == tok.stop_ids and len(tok.stop_ids) == 2
    assert json.loads((tmp_path / "m" / "config.json").read_text())["eos_token_id"] == tok.eos_id

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Add 2 and 3."}]
    ours = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ours == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(ours)
    assert ids == hf_tok(ours)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (model(x) - hf_model(x).logits).abs().max().item() < 1e-4
    reloaded = checkpoint.load_tokenizer(tmp_path / "m")
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True) == ours
