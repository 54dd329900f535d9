"""Shared fixtures: tiny random Hugging Face checkpoints of each supported family, made by transformers itself.

Every test runs offline (HF_HUB_OFFLINE=1), on few threads and without compiling (LMFORGE_COMPILE=0), so the
suite fits two CPU cores.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no verb or server compiles its decode step here (a cold compile costs seconds to minutes on 2 cores), servers
# started as processes included; tests about compiling turn it back on (tests/inference/test_compiled.py); training
# runs compile only where a test asks for it with --compile (training/compile.py: the flag wins over the variable)
os.environ.setdefault("LMFORGE_COMPILE", "0")

import pytest  # noqa: E402

HF_FAMILIES = ("llama", "mistral", "qwen2")


def make_hf_model(family: str, out_dir, vocab_size: int = 256, tie: bool = False, seed: int = 0, **overrides):
    """Save a tiny random transformers model of `family` to out_dir with save_pretrained."""
    import torch
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if family == "llama":
        cfg = transformers.LlamaConfig(rope_theta=10000.0, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **common)
        model = transformers.MistralForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():  # HF inits some weights to zero/one; randomise everything so parity is meaningful
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(out_dir)
    return model.eval()


@pytest.fixture(params=HF_FAMILIES)
def hf_model(request, tmp_path):
    d = tmp_path / request.param
    model = make_hf_model(request.param, d)
    return request.param, d, model


@pytest.fixture(scope="session")
def smollm2_file():
    from lmforge.errors import LmforgeError
    from lmforge.inference.load import packaged_gguf

    try:
        return packaged_gguf("smollm2-135m-instruct")
    except LmforgeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_file, tmp_path_factory):
    """The SmolLM2 GGUF imported by lmforge (float32), once per session."""
    from lmforge.inference.gguf_import import import_gguf

    return import_gguf(smollm2_file, tmp_path_factory.mktemp("smollm2") / "model")


