"""lmforge's GGUF files in real llama.cpp (llama-cpp-python): the same ids for a text sample, the same greedy
tokens for an f32 export, quantized logits within the rounding's own effect, chat replies that end at the
end-of-turn token, and the real SmolLM2 file through import -> export -> llama.cpp."""

import numpy as np
import pytest
import torch

from lmforge import checkpoint, gguf
from lmforge.inference.convert import export_gguf
from tests.gguf.shared import SAMPLE, llama, llama_logits, lmforge_logits

llama_cpp = pytest.importorskip("llama_cpp")
SPECIALS = "<|im_start|>user\nWhat's 12+30?<|im_end|>\n<|im_start|>assistant\n"


def _llama_ids(path, text):
    return llama(path).tokenize(text.encode(), add_bos=False, special=True)


@pytest.mark.parametrize("split", ["llama-bpe", "qwen2", "gpt-2", "smollm"])
def test_tokenization_equals_llama_cpp(split, family_dir, tmp_path):
    """lmforge's tokenizer split each llama.cpp way (the model is the same tiny one): same ids in llama.cpp."""
    import json

    import tokenizers

    from lmforge.tokenizer import Tokenizer

    d = family_dir("llama")
    tok = checkpoint.load_tokenizer(d)
    data = json.loads(tok.backend.to_str())
    data["pre_tokenizer"] = gguf.PRE_TOKENIZERS[split]
    tok = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(data)), chat_template=tok.chat_template,
                    **tok.special_tokens)
    report = gguf.write_gguf(checkpoint.load_model(d), tok, tmp_path / "t.gguf", "f16")
    assert report.pre_tokenizer == split
    for text in (SAMPLE, SPECIALS, " leading space", "x" * 50 + "\n\n\n"):
        assert _llama_ids(report.path, text) == tok.encode(text, add_special_tokens=False), text


def test_smollm2_tokenization_equals_llama_cpp(smollm2_file, smollm2_dir):
    tok = checkpoint.load_tokenizer(smollm2_dir)
    for text in (SAMPLE, SPECIALS):
        assert _llama_ids(smollm2_file, text) == tok.encode(text, add_special_tokens=False)


def _lmforge_greedy(model, ids, n, eos_ids=()):
    from lmforge.inference.engine import Engine
    from lmforge.inference.sampling import SamplingParams

    model = checkpoint.load_model(model) if not isinstance(model, torch.nn.Module) else model
    return Engine(model, max_batch=1, eos_ids=list(eos_ids)).generate(
        [ids], SamplingParams(temperature=0.0, max_tokens=n))[0]


def _llama_greedy(path, ids, n):
    llm = llama(path)
    llm.eval(ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


@pytest.mark.parametrize("family", ["llama", "tied", "qwen2", "mistral", "llama31"])
def test_f32_export_greedy_equals_lmforge(family, family_dir, exported):
    d = family_dir(family)
    ids = checkpoint.load_tokenizer(d).encode(SAMPLE)[:24]
    f = exported(family, "f32")
    assert _llama_greedy(f, ids, 16) == _lmforge_greedy(d, ids, 16)
    diff = np.abs(llama_logits(f, ids) - lmforge_logits(d, ids)).max()
    assert diff < 1e-4, diff


def _q8_round(w: torch.Tensor) -> torch.Tensor:
    """w rounded as Q8_0 rounds it: blocks of 32, q = round(x / d) with d = amax / 127, d kept in f16."""
    blocks = w.reshape(-1, 32)
    d = blocks.abs().amax(1, keepdim=True) / 127
    x = blocks * torch.where(d == 0, 0, 1 / d)
    q = torch.sign(x) * torch.floor(x.abs() + 0.5)  # half away from zero, as ggml rounds
    return (q * d.half().float()).reshape(w.shape)


def _q8_rounding_effect(model, ids):
    """How far lmforge's logits move when every matrix is rounded to Q8_0 blocks (32 values, 8 bits, one f16
    scale). llama.cpp rounds each matmul's activations to the same kind of block before a Q8_0/Q4_0/Q5_0 dot
    product (Q8_1 for Q4_1/Q5_1), so that rounding, at the same resolution, moves its logits by about as much."""
    import copy

    m = checkpoint.load_model(model) if not isinstance(model, torch.nn.Module) else copy.deepcopy(model)
    with torch.no_grad():
        ref = m(torch.tensor([ids]))[0]
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(_q8_round(p))
        return float((m(torch.tensor([ids]))[0] - ref).abs().max())


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q5_1"])
def test_quantized_logits_within_the_rounding_tolerance(kind, family_dir, exported):
    """llama.cpp on a quantized export vs lmforge on the very weights in that file (dequantized): they differ only
    by llama.cpp's activation rounding, bounded by twice the measured effect of 8-bit block rounding."""
    d = family_dir("llama")
    ids = checkpoint.load_tokenizer(d).encode(SAMPLE)[:64]
    tol = 2 * _q8_rounding_effect(d, ids) + 1e-4
    f = exported("llama", kind)
    exact = gguf.read_gguf(f).to_model()
    with torch.no_grad():
        same_weights = exact(torch.tensor([ids]))[0].numpy()
    theirs = llama_logits(f, ids)
    assert np.abs(theirs - same_weights).max() <= tol
    # and against the unquantized model: the weight rounding itself plus that tolerance
    fp32 = lmforge_logits(d, ids)
    assert np.abs(theirs - fp32).max() <= np.abs(same_weights - fp32).max() + tol


def test_end_of_turn_metadata_in_llama_cpp(exported, family_dir):
    tok = checkpoint.load_tokenizer(family_dir("llama"))
    llm = llama(exported("llama", "q8_0"))  # keep it alive: vocab points into it
    vocab = llm._model.vocab
    im_end = tok.token_to_id("<|im_end|>")
    assert llama_cpp.llama_vocab_eot(vocab) == im_end
    assert llama_cpp.llama_vocab_is_eog(vocab, im_end) and llama_cpp.llama_vocab_is_eog(vocab, tok.eos_id)
    assert not llama_cpp.llama_vocab_get_add_bos(vocab)


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_dir, gguf_root):
    """The imported SmolLM2 written back as an f32 GGUF: the dequantized Q4_1 weights exactly."""
    return export_gguf(smollm2_dir, gguf_root / "smollm2-roundtrip-f32.gguf", "f32").path


def test_smollm2_round_trip_in_llama_cpp(smollm2_file, smollm2_dir, smollm2_model, smollm2_f32):
    orig, ours = gguf.read_metadata(smollm2_file), gguf.read_metadata(smollm2_f32)
    for k in ("tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
              "llama.rope.freq_base", "llama.attention.head_count_kv", "llama.context_length"):
        assert ours[k] == orig[k], k
    assert _llama_ids(smollm2_f32, SAMPLE + SPECIALS) == _llama_ids(smollm2_file, SAMPLE + SPECIALS)
    tok = checkpoint.load_tokenizer(smollm2_dir)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name a color."}],
                                             add_generation_prompt=True), add_special_tokens=False)
    ref = lmforge_logits(smollm2_model, ids)
    # our f32 file in llama.cpp: lmforge's own logits, to float32 accumulation order
    assert np.abs(llama_logits(smollm2_f32, ids) - ref).max() < 1e-3
    # the original Q4_1 file: the same weights, but llama.cpp rounds activations to Q8_1 for its Q4_1 dot products
    tol = 2 * _q8_rounding_effect(smollm2_model, ids)
    assert np.abs(llama_logits(smollm2_file, ids) - ref).max() <= tol


def test_chat_completion_ends_at_the_end_of_turn(smollm2_dir, smollm2_model, smollm2_f32):
    """llama.cpp's own chat path (the GGUF's template, its stop logic) stops where lmforge's greedy reply stops."""
    from lmforge.inference.generate import chat_ids

    messages = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
    llm = llama(smollm2_f32, logits_all=False)
    r = llm.create_chat_completion(messages, max_tokens=64, temperature=0.0, top_k=1)
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and r["usage"]["completion_tokens"] < 64
    tok = checkpoint.load_tokenizer(smollm2_dir)
    ours = _lmforge_greedy(smollm2_model, chat_ids(tok, messages), 64, checkpoint.eos_ids(smollm2_dir))
    assert ours[-1] in checkpoint.eos_ids(smollm2_dir)
    assert choice["message"]["content"].strip() == tok.decode(ours[:-1]).strip()


def test_q8_round_is_the_gguf_rounding(family_dir):
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    w = checkpoint.load_model(family_dir("llama")).lm_head.weight.detach()
    want = quants.dequantize(quants.quantize(w.numpy(), Q.Q8_0), Q.Q8_0).reshape(w.shape)
    assert np.array_equal(_q8_round(w).numpy(), want)
