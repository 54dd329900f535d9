"""A tiny random lmforge checkpoint (with a BPE tokenizer trained here) and small task files."""

import json

import pytest

QA = [("What is the capital of France?", "Paris"), ("What colour is the sky?", "blue"),
      ("How many legs has a cat?", "four"), ("What do bees make?", "honey"),
      ("Which planet is red?", "Mars"), ("What is frozen water?", "ice")]
MC = [("What do cows drink?", ["water", "petrol", "sand"], 0), ("Which is a fruit?", ["brick", "apple", "cloud"], 1),
      ("Which animal barks?", ["fish", "snail", "dog"], 2), ("What is hot?", ["fire", "snow", "ice"], 0),
      ("What can fly?", ["stone", "bird", "table"], 1)]
CORPUS = " ".join(f"Question: {q} Answer: {a}." for q, a in QA) + " " + \
    " ".join(f"Question: {q} Answer: {c[i]}." for q, c, i in MC)


def make_tiny_model(out_dir, seed: int = 0, max_seq_len: int = 256):
    """A random 2-layer lmforge model with a small BPE tokenizer, saved as an HF directory."""
    import dataclasses

    from lmforge.checkpoint import save_model
    from lmforge.model.config import preset
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.bpe import train_bpe

    tok = train_bpe(iter([CORPUS] * 20), vocab_size=400)
    cfg = dataclasses.replace(preset("test"), vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                              max_seq_len=max_seq_len)
    model = Transformer(cfg)
    model.init_weights(seed)
    save_model(model, out_dir, tokenizer=tok)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def qa_file(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in QA))
    return p


@pytest.fixture
def mc_file(tmp_path):
    p = tmp_path / "mc.jsonl"
    p.write_text("".join(json.dumps({"question": q, "choices": c, "answer": i}) + "\n" for q, c, i in MC))
    return p
