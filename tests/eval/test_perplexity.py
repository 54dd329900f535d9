"""Sliding-window perplexity against direct computation on a tiny random model."""

import json
import math

import pytest
import torch

from lmforge.checkpoint import load_model, load_tokenizer
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import sliding_nll, windows


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (100, 16, 16), (37, 8, 3), (5, 8, 4), (64, 16, 1)])
def test_windows_score_every_token_once_with_enough_context(n, window, stride):
    targets = []
    for begin, end, first in windows(n, window, stride):
        assert end - begin <= window and begin < first <= end
        targets += range(first, end)
        if begin > 0:  # after the first window, each target sees at least window - stride tokens before it
            assert first - begin >= max(1, window - stride)
    assert targets == list(range(1, n))


@torch.no_grad()
def _direct_nll(model, ids, window, stride):
    """Each target token scored alone: a forward over its window up to the token, the last logit."""
    total = 0.0
    for begin, end, first in windows(len(ids), window, stride):
        for t in range(first, end):
            x = torch.tensor([ids[begin:t]])
            logp = torch.log_softmax(model(x)[0, -1].float(), -1)
            total -= float(logp[ids[t]])
    return total


def test_sliding_nll_equals_direct_computation(tiny_model):
    model = load_model(tiny_model)
    ids = torch.randint(0, model.cfg.vocab_size, (29,), generator=torch.Generator().manual_seed(0)).tolist()
    for window, stride in ((12, 12), (10, 3)):
        nll, count = sliding_nll(model, ids, window, stride, batch_size=3)
        assert count == 28
        assert nll == pytest.approx(_direct_nll(model, ids, window, stride), rel=1e-5)
    # one window over the whole text is plain cross-entropy
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    ce = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="sum")
    assert sliding_nll(model, ids, 29, 29)[0] == pytest.approx(float(ce), rel=1e-5)


def test_cli_on_text_file_and_prepared_dir(tiny_model, tmp_path, capsys):
    from lmforge.data.shards import ShardWriter

    text = "The quick brown fox jumps over the lazy dog. " * 12
    (tmp_path / "t.txt").write_text(text)
    out = tmp_path / "ppl.json"
    argv = ["eval", "perplexity", "--model", str(tiny_model), "--data", str(tmp_path / "t.txt"),
            "--window", "64", "--stride", "32", "--json", "--out", str(out)]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == r
    tok = load_tokenizer(tiny_model)
    ids = [*tok.encode(text), tok.eos_id]  # documents end with EOS, as prepared shards hold them
    nll, count = sliding_nll(load_model(tiny_model), ids, 64, 32)
    assert r["tokens_scored"] == count == len(ids) - 1
    assert r["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)

    # a prepared data directory: its val shards, read through data/shards.py
    d = tmp_path / "prepared"
    d.mkdir()
    w = ShardWriter(d, "val", "uint16", shard_tokens=50)
    w.write(ids)
    shards = w.close()
    (d / "manifest.json").write_text(json.dumps({"format": 1, "dtype": "uint16", "vocab_size": tok.vocab_size,
                                                 "splits": {"val": {"shards": shards, "tokens": len(ids),
                                                                    "bytes": len(text.encode())}}}))
    assert main(["eval", "perplexity", "--model", str(tiny_model), "--data", str(d), "--window", "64",
                 "--stride", "32", "--json"]) == 0
    r2 = json.loads(capsys.readouterr().out)
    assert r2["nll"] == pytest.approx(r["nll"], rel=1e-6) and r2["tokens_scored"] == r["tokens_scored"]


def test_errors(tiny_model, tmp_path, capsys):
    assert main(["eval", "perplexity", "--model", str(tiny_model), "--data", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "one.txt").write_text("")
    assert main(["eval", "perplexity", "--model", str(tiny_model), "--data", str(tmp_path / "one.txt")]) == 2
    assert "at least 2" in capsys.readouterr().err
    with pytest.raises(LmforgeError, match="stride"):
        windows(10, 4, 5)


def test_chat_eos_is_not_scored_after_text(tiny_model, tmp_path, capsys):
    """A chat model whose EOS is its end-of-turn token (SmolLM2: <|im_end|>) scores a text's own tokens only, and a
    .jsonl's documents are separated by the document-end token; a document-end EOS is still scored after each."""
    import shutil

    d = tmp_path / "chat-eos"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|im_end|>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.eos_token == "<|im_end|>"
    text = "The quick brown fox jumps over the lazy dog. " * 6
    (tmp_path / "t.txt").write_text(text)
    assert main(["eval", "perplexity", "--model", str(d), "--data", str(tmp_path / "t.txt"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    ids = tok.encode(text)
    nll, count = sliding_nll(load_model(d), ids, 256, 128)
    assert r["tokens"] == len(ids) and r["tokens_scored"] == count == len(ids) - 1
    assert r["nll"] == pytest.approx(nll / count, rel=1e-6)

    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "one doc"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert main(["eval", "perplexity", "--model", str(d), "--data", str(tmp_path / "t.jsonl"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    sep = tok.token_to_id("<|end_of_text|>")
    assert r["tokens"] == len([*tok.encode("one doc"), sep, *tok.encode("two")])
    # the document-end EOS of lmforge's own tokenizer: after every document, as prepare writes them
    assert main(["eval", "perplexity", "--model", str(tiny_model), "--data", str(tmp_path / "t.jsonl"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == len(tok.encode("one doc")) + len(tok.encode("two")) + 2
