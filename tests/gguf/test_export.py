"""GGUF export, checked by reading the file back: metadata llama.cpp reads, tensor types, the q/k permutation,
the rounding of each quant type, the pre-tokenizer choice, add_bos and end-of-turn ids, Ollama's Modelfile."""

import json

import numpy as np
import pytest
import tokenizers
import torch

from lmforge import checkpoint, gguf
from lmforge.errors import LmforgeError
from lmforge.inference.convert import ExportOllamaConfig, export_gguf, run_export_ollama
from lmforge.tokenizer import Tokenizer, bpe
from tests.gguf.shared import SAMPLE


def test_lmforge_split_is_llama3s():
    # the claim the pre-tokenizer choice rests on: lmforge trains with Llama 3's split
    assert bpe.SPLIT_PATTERN == gguf.LLAMA3_SPLIT


def _with_pre(tok: Tokenizer, pre_tokenizer: dict) -> Tokenizer:
    data = json.loads(tok.backend.to_str())
    data["pre_tokenizer"] = pre_tokenizer
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(data)), chat_template=tok.chat_template,
                     **tok.special_tokens)


def test_pre_tokenizer_names(family_dir):
    tok = checkpoint.load_tokenizer(family_dir("llama"))
    assert gguf.pre_tokenizer_name(tok) == "llama-bpe"
    for name, spec in gguf.PRE_TOKENIZERS.items():
        assert gguf.pre_tokenizer_name(_with_pre(tok, spec)) == name
    odd = _with_pre(tok, {"type": "Whitespace"})
    with pytest.raises(LmforgeError, match="--pre-tokenizer NAME"):
        gguf.pre_tokenizer_name(odd)


def test_unknown_pre_tokenizer_is_an_error_unless_named(family_dir, tmp_path):
    model = checkpoint.load_model(family_dir("llama"))
    tok = _with_pre(checkpoint.load_tokenizer(family_dir("llama")), {"type": "Whitespace"})
    with pytest.raises(LmforgeError, match="pre-tokenizer"):
        gguf.write_gguf(model, tok, tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "x.gguf").exists()
    report = gguf.write_gguf(model, tok, tmp_path / "x.gguf", "f32", pre_tokenizer="gpt-2")
    assert gguf.read_metadata(report.path)["tokenizer.ggml.pre"] == "gpt-2"


def test_metadata_llama_cpp_reads(exported, family_dir):
    d = family_dir("llama")
    tok, cfg = checkpoint.load_tokenizer(d), checkpoint.load_config(d)
    meta = gguf.read_metadata(exported("llama", "f32"))
    assert meta["general.architecture"] == "llama"
    expect = {"llama.block_count": cfg.n_layers, "llama.embedding_length": cfg.hidden_size,
              "llama.feed_forward_length": cfg.intermediate_size, "llama.attention.head_count": cfg.n_heads,
              "llama.attention.head_count_kv": cfg.n_kv_heads, "llama.context_length": cfg.max_seq_len,
              "llama.rope.dimension_count": cfg.head_size, "llama.vocab_size": cfg.vocab_size}
    assert {k: meta[k] for k in expect} == expect
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_id and meta["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert meta["tokenizer.ggml.padding_token_id"] == tok.pad_id
    assert meta["tokenizer.ggml.eot_token_id"] == tok.token_to_id("<|im_end|>") != tok.eos_id
    assert meta["tokenizer.ggml.add_bos_token"] is False  # ChatML writes no BOS, so llama.cpp must not add one
    assert meta["tokenizer.chat_template"] == tok.chat_template


def test_token_list_types_and_merges(exported, family_dir):
    tok = checkpoint.load_tokenizer(family_dir("llama"))
    reader = gguf._open_reader(exported("llama", "f32"))
    tokens, types = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    assert len(tokens) == tok.vocab_size
    assert [tokens[i] for i in sorted(tok.special_ids)] == ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>",
                                                             "<|im_start|>", "<|im_end|>"]
    assert all(types[i] == gguf.CONTROL for i in tok.special_ids)
    assert all(t == gguf.NORMAL for i, t in enumerate(types) if i not in tok.special_ids)
    merges = json.loads(tok.backend.to_str())["model"]["merges"]
    assert reader.fields["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]


def test_embedding_padded_past_the_tokenizer_is_unused(tmp_path, family_dir):
    from lmforge.model.transformer import Transformer

    tok = checkpoint.load_tokenizer(family_dir("tied"))
    cfg = checkpoint.load_config(family_dir("tied")).replace(vocab_size=tok.vocab_size + 6)
    big = Transformer(cfg)
    big.init_weights(0)
    gguf.write_gguf(big, tok, tmp_path / "p.gguf", "f32")
    reader = gguf._open_reader(tmp_path / "p.gguf")
    assert reader.fields["tokenizer.ggml.tokens"][-6:] == [f"[PAD{i}]" for i in range(tok.vocab_size, cfg.vocab_size)]
    assert reader.fields["tokenizer.ggml.token_type"][-6:] == [gguf.UNUSED] * 6
    back = gguf.read_gguf(tmp_path / "p.gguf")
    assert back.cfg.vocab_size == cfg.vocab_size and back.tokenizer.vocab_size == tok.vocab_size


@pytest.mark.parametrize("family", ["llama", "tied", "mistral", "qwen2", "llama31"])
def test_f32_round_trip_is_exact(family, family_dir, exported):
    d = family_dir(family)
    model, tok = checkpoint.load_model(d), checkpoint.load_tokenizer(d)
    back = gguf.read_gguf(exported(family, "f32"))
    assert back.cfg == model.cfg
    state = model.state_dict()
    assert set(back.tensors) == {k for k in state if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    for k, v in back.tensors.items():
        assert torch.equal(v, state[k]), k
    assert back.tokenizer.encode(SAMPLE) == tok.encode(SAMPLE)
    assert back.tokenizer.chat_template == tok.chat_template and back.tokenizer.special_tokens == tok.special_tokens
    assert back.stop_ids == checkpoint.eos_ids(d)


def test_tensor_layout(exported, family_dir):
    reader = gguf._open_reader(exported("llama", "q8_0"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    assert "output.weight" not in {t.name for t in gguf._open_reader(exported("tied", "f16")).tensors}
    qwen = {t.name: t.tensor_type.name for t in gguf._open_reader(exported("qwen2", "q4_0")).tensors}
    assert qwen["blk.1.attn_q.bias"] == qwen["blk.1.attn_v.bias"] == "F32"
    assert gguf.read_metadata(exported("mistral", "f16"))["llama.attention.sliding_window"] == 64
    freqs = next(t for t in gguf._open_reader(exported("llama31", "f16")).tensors if t.name == "rope_freqs.weight")
    assert freqs.tensor_type.name == "F32" and list(freqs.shape) == [16]  # head_dim 32


def test_qk_rows_are_permuted_for_llama_only(exported, family_dir):
    """llama.cpp's llama graph pairs adjacent values; HF's rotate-half pairs (i, i + D/2); qwen2 needs nothing."""
    for family, permuted in (("llama", True), ("qwen2", False)):
        model = checkpoint.load_model(family_dir(family))
        reader = gguf._open_reader(exported(family, "f32"))
        raw = {t.name: np.array(reader.data(t)) for t in reader.tensors}
        cfg = model.cfg
        for hf, g, heads in (("q_proj", "attn_q", cfg.n_heads), ("k_proj", "attn_k", cfg.n_kv_heads)):
            w = model.state_dict()[f"model.layers.0.self_attn.{hf}.weight"].numpy()
            want = w.reshape(heads, 2, cfg.head_size // 2, -1).swapaxes(1, 2).reshape(w.shape) if permuted else w
            assert np.array_equal(raw[f"blk.0.{g}.weight"], want)
            # row 1 of head 0 in llama.cpp's order is the partner of row 0: HF's row D/2
            if permuted:
                assert np.array_equal(raw[f"blk.0.{g}.weight"][1], w[cfg.head_size // 2])


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_rounding_is_within_the_block_step(kind, exported, family_dir):
    """Each value moves by at most its block's rounding step: amax/127/2 for q8_0; for q4_0/q5_0 one step of
    amax/8 (amax/16) since the far end of the range is clamped; (max-min)/15/2 and /31/2 for q4_1/q5_1.
    The block scale itself is stored in f16 (relative error 2^-11), which adds that much of amax."""
    model = checkpoint.load_model(family_dir("llama"))
    back = gguf.read_gguf(exported("llama", kind))
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        w = model.state_dict()[name].numpy().reshape(-1, 32)
        q = back.tensors[name].numpy().reshape(-1, 32)
        amax = np.abs(w).max(1, keepdims=True)
        spread = w.max(1, keepdims=True) - w.min(1, keepdims=True)
        step = {"q8_0": amax / 127 / 2, "q4_0": amax / 8, "q5_0": amax / 16, "q4_1": spread / 15 / 2,
                "q5_1": spread / 31 / 2}[kind]
        err = np.abs(q - w)
        assert (err <= step + amax * 2.0 ** -10).all(), name
        assert err.max() > 0  # it did round


def test_rows_not_a_multiple_of_32_fall_back_to_f16(tmp_path):
    from tests.inference.tiny import make_model_dir

    d = make_model_dir(tmp_path / "odd", intermediate_size=344)  # 344 = 10.75 blocks
    report = export_gguf(d, tmp_path / "odd.gguf", "q4_0")
    assert len(report.fallbacks) == 2 and any("F16" in w for w in report.warnings)
    types = {t.name: t.tensor_type.name for t in gguf._open_reader(tmp_path / "odd.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"


def test_add_bos_follows_the_template(family_dir, tmp_path):
    model = checkpoint.load_model(family_dir("llama"))
    tok = checkpoint.load_tokenizer(family_dir("llama"))
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    gguf.write_gguf(model, tok, tmp_path / "bos.gguf", "f16")
    assert gguf.read_metadata(tmp_path / "bos.gguf")["tokenizer.ggml.add_bos_token"] is True


def test_eos_that_ends_turns_is_the_eot(smollm2_dir, tmp_path):
    """SmolLM2's EOS is <|im_end|> itself: it is also the end-of-turn id llama.cpp stops chat replies on."""
    report = export_gguf(smollm2_dir, tmp_path / "s.gguf", "f16")
    meta = gguf.read_metadata(report.path)
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.eot_token_id"] == 2
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and meta["tokenizer.ggml.add_bos_token"] is False


def test_adapter_is_merged_first(tmp_path, family_dir):
    from lmforge.finetune.merge import merge_adapter
    from lmforge.model.lora import apply_lora

    base = family_dir("llama")
    m = checkpoint.load_model(base)
    apply_lora(m, rank=4, alpha=8.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    checkpoint.save_adapter(m, tmp_path / "adapter", base_model_name_or_path=str(base))
    export_gguf(base, tmp_path / "a.gguf", "f32", adapter=tmp_path / "adapter")
    merged = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")
    export_gguf(merged, tmp_path / "m.gguf", "f32")
    a, b = gguf.read_gguf(tmp_path / "a.gguf"), gguf.read_gguf(tmp_path / "m.gguf")
    plain = gguf.read_gguf(export_gguf(base, tmp_path / "p.gguf", "f32").path)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(a.tensors[q], b.tensors[q], atol=1e-6) and not torch.allclose(a.tensors[q], plain.tensors[q])


def test_k_quants_without_a_quantizer_say_what_to_install(monkeypatch, family_dir, tmp_path):
    from lmforge.inference import convert

    monkeypatch.setattr(convert, "_quantizer", lambda: None)
    with pytest.raises(LmforgeError, match="llama-quantize"):
        export_gguf(family_dir("llama"), tmp_path / "k.gguf", "q4_k_m")
    with pytest.raises(LmforgeError, match="unknown --type"):
        export_gguf(family_dir("llama"), tmp_path / "k.gguf", "q3_0")


def test_ollama_modelfile(family_dir, tmp_path, capsys):
    out = tmp_path / "ollama"
    run_export_ollama(ExportOllamaConfig(model=str(family_dir("llama")), out=str(out), type="q8_0", name="tiny"))
    text = (out / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in text and (out / "model-q8_0.gguf").is_file()
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|end_of_text|>"' in text
    assert "SYSTEM" not in text
    assert capsys.readouterr().out.strip() == f"ollama create tiny -f {out / 'Modelfile'}"


def test_ollama_default_system_prompt(smollm2_dir):
    from lmforge.inference.convert import modelfile

    tok = checkpoint.load_tokenizer(smollm2_dir)
    text, notes = modelfile("m.gguf", tok, [2], 8192)
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text and not notes


def test_ollama_k_quant_without_quantizer_quantizes_at_create(monkeypatch, family_dir, tmp_path, capsys):
    from lmforge.inference import convert

    monkeypatch.setattr(convert, "_quantizer", lambda: None)
    out = tmp_path / "o"
    run_export_ollama(ExportOllamaConfig(model=str(family_dir("llama")), out=str(out), type="q4_k_m"))
    assert (out / "model-f16.gguf").is_file()
    assert capsys.readouterr().out.strip().endswith("--quantize q4_K_M")


LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
                   "{# tools: <|eom_id|> ends a tool call #}")


def test_llama3_instruct_style_ids(family_dir, tmp_path):
    """EOS is <|eot_id|>, generation also stops on <|end_of_text|> and <|eom_id|>, the template writes the BOS:
    end-of-turn <|eot_id|>, end-of-message <|eom_id|>, add_bos true; Ollama gets the Llama 3 Go template."""
    from lmforge.inference.convert import modelfile
    from lmforge.model.transformer import Transformer

    base = checkpoint.load_tokenizer(family_dir("llama"))
    backend = tokenizers.Tokenizer.from_str(base.backend.to_str())
    backend.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"])
    tok = Tokenizer(backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>",
                    chat_template=LLAMA3_TEMPLATE)
    model = Transformer(checkpoint.load_config(family_dir("llama")).replace(vocab_size=tok.vocab_size))
    model.init_weights(0)
    ids = {t: tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
    report = gguf.write_gguf(model, tok, tmp_path / "l3.gguf", "f16", stop_ids=list(ids.values()))
    meta = gguf.read_metadata(report.path)
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.eot_token_id"] == ids["<|eot_id|>"]
    assert meta["tokenizer.ggml.eom_token_id"] == ids["<|eom_id|>"]
    assert meta["tokenizer.ggml.add_bos_token"] is True and not report.warnings
    text, notes = modelfile("l3.gguf", tok, list(ids.values()), 4096)
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in text and not notes
    assert all(f'PARAMETER stop "{t}"' in text for t in ids)
