"""lmforge prepare: shards, manifest, EOS separation, validation split, reuse, bad input."""

import json

import numpy as np
import pytest

from lmforge.data.shards import TokenShards, read_manifest
from lmforge.errors import LmforgeError
from lmforge.pretrain.prepare import PrepareConfig
from lmforge.pretrain.prepare import run as prepare
from lmforge.tokenizer import Tokenizer


def test_prepared_directory(prepared):
    m = read_manifest(prepared)
    tok = Tokenizer.load(prepared / "tokenizer")
    assert m["dtype"] == "uint16" and m["vocab_size"] == tok.vocab_size == 512
    assert m["sources"] == ["default"] and len(m["tokenizer"]["sha256"]) == 64
    train, val = TokenShards(prepared, "train"), TokenShards(prepared, "val")
    assert len(train) == m["splits"]["train"]["tokens"] > 50_000 and len(val) > 0
    docs = m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"]
    eos = int((train.read(0, len(train)) == tok.eos_id).sum() + (val.read(0, len(val)) == tok.eos_id).sum())
    assert eos == docs == m["corpus"]["documents"]  # one EOS after every document
    assert train.read(len(train) - 1, len(train))[0] == tok.eos_id
    # the shards decode back to the corpus text
    first_doc = train.read(0, int(np.argmax(train.read(0, 20_000) == tok.eos_id)))
    assert "def " in tok.decode(first_doc) or "import" in tok.decode(first_doc)


def test_reuse_and_rebuild(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world, hello tokens.\n" * 200)
    (tmp_path / "b.md").write_text("# notes\n\nsome markdown text here.\n" * 100)
    cfg = PrepareConfig(corpus=[str(tmp_path / "a.txt"), str(tmp_path / "b.md")], out=str(tmp_path / "d"),
                        vocab_size=300)
    assert prepare(cfg) == 0
    first = read_manifest(tmp_path / "d")
    assert first["splits"]["val"]["tokens"] > 0  # two documents: the held-out tail of train
    capsys.readouterr()
    assert prepare(cfg) == 0
    assert "reusing" in capsys.readouterr().err
    assert read_manifest(tmp_path / "d")["created"] == first["created"]
    cfg.vocab_size = 320
    prepare(cfg)
    assert "reusing" not in capsys.readouterr().err
    assert read_manifest(tmp_path / "d")["fingerprint"] != first["fingerprint"]
    # an existing tokenizer is taken as is
    other = PrepareConfig(corpus=[str(tmp_path / "a.txt")], out=str(tmp_path / "e"),
                          tokenizer=str(tmp_path / "d" / "tokenizer"))
    prepare(other)
    m = read_manifest(tmp_path / "e")
    assert m["tokenizer"]["trained"] is False
    assert m["tokenizer"]["sha256"] == read_manifest(tmp_path / "d")["tokenizer"]["sha256"]


def test_jsonl_and_non_utf8_are_reported(tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": f"document number {i} says hi."})
                                                   for i in range(300)))
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n" * 50)
    prepare(PrepareConfig(corpus=[str(tmp_path / "docs.jsonl"), str(tmp_path / "bad.txt")],
                          out=str(tmp_path / "d"), vocab_size=300))
    m = read_manifest(tmp_path / "d")
    assert m["corpus"]["documents"] == 301
    assert m["corpus"]["replaced_files"] == [str(tmp_path / "bad.txt")] and m["corpus"]["replacement_chars"] == 50
    assert "not valid UTF-8" in capsys.readouterr().err


def test_bad_corpora(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LmforgeError, match="empty|no text"):
        prepare(PrepareConfig(corpus=[str(tmp_path / "empty.txt")], out=str(tmp_path / "d"), vocab_size=300))
    with pytest.raises(LmforgeError, match="does not exist"):
        prepare(PrepareConfig(corpus=[str(tmp_path / "missing")], out=str(tmp_path / "d")))
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("not a data directory " * 50)
    with pytest.raises(LmforgeError, match="not a prepared data directory"):
        prepare(PrepareConfig(corpus=[str(tmp_path / "keep")], out=str(tmp_path / "keep"), vocab_size=300))
    assert (tmp_path / "keep" / "precious.txt").is_file()
