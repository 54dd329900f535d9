"""GGUF import: a .gguf of any type becomes an HF directory whose logits equal transformers' own GGUF loading of
the same file and whose chat ids equal transformers' apply_chat_template; bad files are one clear error."""

import json
import struct

import numpy as np
import pytest
import torch

from lmforge import checkpoint, gguf
from lmforge.errors import LmforgeError
from lmforge.inference.gguf_import import import_gguf
from tests.gguf.shared import SAMPLE

pytest.importorskip("transformers")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2? Say it."},
            {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}]


def _hf_from_gguf(path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# llama31 is left out: transformers' GGUF loader ignores the rope_freqs tensor (Llama 3.1 scaling); llama.cpp is
# its reference in test_llamacpp.py. The wide model's rows fill 256-value blocks, so its K-quants are K-quants.
CASES = [("llama", "f32"), ("llama", "q8_0"), ("llama", "q4_0"), ("tied", "q4_1"), ("qwen2", "q5_0"),
         ("mistral", "q5_1"), ("qwen2", "bf16"), ("tied", "f16"), ("wide", "q4_k_m"), ("wide", "q6_k")]


@pytest.mark.parametrize("family,kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_logits_equal_transformers_gguf_loading(family, kind, exported, tmp_path):
    f = exported(family, kind)
    out = import_gguf(f, tmp_path / "imported")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    tok = checkpoint.load_tokenizer(out)
    ids = tok.encode(SAMPLE)[:48]  # within the mistral model's 64-token window
    ours = checkpoint.load_model(out)(torch.tensor([ids]))[0].detach()
    theirs = _hf_logits(_hf_from_gguf(f), ids)
    assert torch.allclose(ours, theirs, atol=2e-5, rtol=0), (ours - theirs).abs().max()
    if kind.endswith("_k") or "_k_" in kind:
        assert any(t.startswith(("Q4_K", "Q6_K")) for t in gguf.read_tensor_types(f))


def test_imported_directory_is_a_transformers_directory(exported, tmp_path):
    import transformers

    out = import_gguf(exported("qwen2", "q8_0"), tmp_path / "q")
    ids = checkpoint.load_tokenizer(out).encode(SAMPLE)[:40]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = checkpoint.load_model(out)(torch.tensor([ids]))[0].detach()
    assert torch.allclose(ours, _hf_logits(hf, ids), atol=2e-5, rtol=0)
    htok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert htok.encode(SAMPLE, add_special_tokens=False) == checkpoint.load_tokenizer(out).encode(SAMPLE)


def _chat_ids_match_transformers(gguf_file, model_dir):
    import transformers

    htok = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tok = checkpoint.load_tokenizer(model_dir)
    for gen_prompt in (True, False):
        want = htok.apply_chat_template(MESSAGES, add_generation_prompt=gen_prompt, tokenize=True)
        want = list(want["input_ids"] if hasattr(want, "keys") else want)
        text = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen_prompt)
        assert tok.encode(text, add_special_tokens=False) == want
    assert tok.encode(SAMPLE, add_special_tokens=False) == htok.encode(SAMPLE, add_special_tokens=False)


def test_chat_ids_equal_transformers(exported, tmp_path):
    f = exported("llama", "q8_0")
    _chat_ids_match_transformers(f, import_gguf(f, tmp_path / "l"))


def test_smollm2_chat_ids_equal_transformers(smollm2_file, smollm2_dir):
    """The real file: 49k tokens, 48.9k merges, SmolLM2's template with its default system prompt."""
    _chat_ids_match_transformers(smollm2_file, smollm2_dir)
    cfg = checkpoint.load_config(smollm2_dir)
    assert (cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings) == (30, 576, 9, 3, True)
    assert checkpoint.eos_ids(smollm2_dir) == [2]
    assert checkpoint.read_lineage(smollm2_dir)["lineage"]["gguf_file_type"] == "MOSTLY_Q4_1"


def test_llama31_scaling_is_recovered(exported, family_dir):
    back = gguf.read_gguf(exported("llama31", "q8_0"))
    assert back.cfg.rope_scaling == checkpoint.load_config(family_dir("llama31")).rope_scaling


# ---- bad input: one LmforgeError each, and the CLI prints it without a traceback -------------------------------
def _cli(capsys, *args):
    from lmforge.cli import main

    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_not_a_gguf(tmp_path, capsys):
    f = tmp_path / "model.gguf"
    f.write_text("this is text, not a model\n")
    with pytest.raises(LmforgeError, match="is not a GGUF file"):
        gguf.read_gguf(f)
    rc, err = _cli(capsys, "import", "gguf", str(f), "--out", str(tmp_path / "o"))
    assert rc == 2 and err.startswith("error: ") and "is not a GGUF file" in err


def test_truncated_file(exported, tmp_path, capsys):
    src = exported("llama", "q4_0")
    for keep in (src.stat().st_size - 1000, 2000, 30):  # cut in the tensor data, in the metadata, in the header
        f = tmp_path / f"cut-{keep}.gguf"
        f.write_bytes(src.read_bytes()[:keep])
        with pytest.raises(LmforgeError, match="truncated"):
            gguf.read_gguf(f)
    rc, err = _cli(capsys, "import", "gguf", str(f), "--out", str(tmp_path / "o"))
    assert rc == 2 and err.startswith("error: ") and "truncated" in err


def test_unsupported_architecture(tmp_path):
    import gguf as gg

    f = tmp_path / "gpt2.gguf"
    w = gg.GGUFWriter(str(f), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LmforgeError, match="architecture 'gpt2' is not supported"):
        gguf.read_gguf(f)


def test_damaged_header_is_an_error(exported, tmp_path):
    f = tmp_path / "bad.gguf"
    data = bytearray(exported("llama", "f16").read_bytes())
    data[16:24] = struct.pack("<Q", 1 << 40)  # an absurd key count
    f.write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match="damaged"):
        gguf.read_gguf(f)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        gguf.read_gguf(tmp_path / "nope.gguf")


def _sentencepiece_gguf(path, family_dir):
    """A Llama 2-style GGUF (tokenizer.ggml.model "llama": SentencePiece pieces with scores, byte fallback) around a
    tiny random model, written with the gguf package directly (lmforge exports byte-level BPE only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    import gguf as gg
    from lmforge.model.transformer import Transformer
    from tests.inference.tiny import TEXT

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    spm = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.train_from_iterator([TEXT] * 10, trainers.BpeTrainer(vocab_size=420, min_frequency=1, special_tokens=specials))
    merges = json.loads(spm.to_str())["model"]["merges"]
    rank = {"".join(m if isinstance(m, list) else m.split(" ")): i for i, m in enumerate(merges)}
    n = spm.get_vocab_size()
    tokens = [spm.id_to_token(i) for i in range(n)]
    types = [gguf.UNKNOWN if t == "<unk>" else gguf.CONTROL if t in ("<s>", "</s>") else
             gguf.BYTE if t.startswith("<0x") else gguf.NORMAL for t in tokens]
    scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]  # SentencePiece merges the best score first

    cfg = checkpoint.load_config(family_dir("llama")).replace(vocab_size=n)
    model = Transformer(cfg)
    model.init_weights(7)
    w = gg.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, cfg.n_layers), (w.add_context_length, cfg.max_seq_len),
                   (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
                   (w.add_head_count, cfg.n_heads), (w.add_head_count_kv, cfg.n_kv_heads),
                   (w.add_rope_dimension_count, cfg.head_size), (w.add_bos_token_id, 1), (w.add_eos_token_id, 2),
                   (w.add_unk_token_id, 0)):
        add(v)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_bos_token(True)
    for k, v in model.state_dict().items():
        name = gguf.gguf_tensor_name(k)
        data = v.numpy()
        if ".attn_q." in name or ".attn_k." in name:
            data = gguf.permute_for_gguf(data, cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads)
        w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_vocabulary(family_dir, tmp_path):
    """Llama 2 / Mistral 7B / TinyLlama style files: lmforge's import tokenizes as transformers and llama.cpp do."""
    import transformers

    f = _sentencepiece_gguf(tmp_path / "spm.gguf", family_dir)
    out = import_gguf(f, tmp_path / "spm")
    tok = checkpoint.load_tokenizer(out)
    htok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=f.name)
    text = "The quick brown fox jumps over the lazy dog. café 東京 ok"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids == htok.encode(text)
    assert tok.decode(ids) == htok.decode(ids, skip_special_tokens=True) == text
    ours = checkpoint.load_model(out)(torch.tensor([ids]))[0].detach()
    assert torch.allclose(ours, _hf_logits(_hf_from_gguf(f), ids), atol=2e-5, rtol=0)
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(f), n_ctx=64, n_threads=1, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=True) == ids


def test_requantized_import_gives_back_the_files_blocks(smollm2_file, smollm2_model):
    """The import undoes the q/k permutation and the block layout exactly: quantizing lmforge's weights again
    (after permuting back) reproduces the original file's Q4_1 bytes, bit for bit."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    reader = gguf._open_reader(smollm2_file)
    raw = {t.name: t for t in reader.tensors}
    state = smollm2_model.state_dict()
    cfg = smollm2_model.cfg
    for layer in (0, 17):
        for hf, name, heads in (("self_attn.q_proj", "attn_q", cfg.n_heads), ("self_attn.k_proj", "attn_k", cfg.n_kv_heads),
                                ("mlp.down_proj", "ffn_down", None)):
            t = raw[f"blk.{layer}.{name}.weight"]
            assert t.tensor_type == Q.Q4_1
            w = state[f"model.layers.{layer}.{hf}.weight"].numpy()
            w = gguf.permute_for_gguf(w, heads) if heads else w
            assert np.array_equal(quants.quantize(np.ascontiguousarray(w), Q.Q4_1), reader.data(t)), t.name
