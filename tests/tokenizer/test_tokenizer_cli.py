"""`lmforge tokenizer train` through the real CLI entry point: files, directories and globs in, HF directory out."""

import pytest

from lmforge.cli import main
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.train import expand_files


def test_cli_trains_and_saves(tmp_path, corpus, capsys):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.txt").write_text(corpus)
    (tmp_path / "data" / "sub" / "b.md").write_text(corpus[:2000])
    (tmp_path / "data" / "skip.bin").write_bytes(b"\xff\xfe")
    (tmp_path / "c.txt").write_text("extra text\n")
    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", "--files", str(tmp_path / "data"), "--file", str(tmp_path / "c*.txt"),
               "--vocab-size", "320", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "vocab_size 320" in captured.out and "bytes/token" in captured.out
    assert "3 file(s)" in captured.err
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 320 and tok.decode(tok.encode("東京 🎉")) == "東京 🎉"


def test_expand_files_order_and_duplicates(tmp_path):
    for name in ("b.txt", "a.txt", "c.jsonl", "d.bin"):
        (tmp_path / name).write_text("x")
    found = expand_files([str(tmp_path), str(tmp_path / "a.txt"), str(tmp_path / "*.txt")])
    assert [p.name for p in found] == ["a.txt", "b.txt", "c.jsonl"]


@pytest.mark.parametrize("args, message", [
    ([], "no training text"),
    (["--files", "/nonexistent.txt"], "does not exist"),
    (["--files", "/nonexistent/*.txt"], "no files match"),
    (["--files", "CORPUS", "--vocab-size", "100"], "too small"),
    (["--files", "EMPTY"], "no text"),
])
def test_cli_errors(tmp_path, corpus, capsys, args, message):
    (tmp_path / "corpus.txt").write_text(corpus)
    (tmp_path / "empty.txt").write_text("\n\n")
    args = [a.replace("CORPUS", str(tmp_path / "corpus.txt")).replace("EMPTY", str(tmp_path / "empty.txt"))
            for a in args]
    assert main(["tokenizer", "train", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_defaults_write_tokenizer_dir_and_say_when_text_is_too_small(tmp_path, corpus, capsys, monkeypatch):
    """With only --files: the result goes to ./tokenizer, and a corpus too small for 8192 ids says so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text(corpus)
    assert main(["tokenizer", "train", "--files", "c.txt"]) == 0
    captured = capsys.readouterr()
    tok = Tokenizer.load(tmp_path / "tokenizer")
    assert tok.vocab_size < 8192
    assert f"the text supports only {tok.vocab_size} ids (asked for 8192)" in captured.err
    assert f"saved tokenizer to tokenizer: vocab_size {tok.vocab_size}" in captured.out


def test_min_frequency_limits_merges_and_training_is_deterministic(tmp_path, corpus, capsys):
    """--min-frequency drops pairs that occur too rarely; the same text and options give the same file."""
    (tmp_path / "c.txt").write_text(corpus)

    def train(out, *extra):
        assert main(["tokenizer", "train", "--files", str(tmp_path / "c.txt"), "--vocab-size", "4000",
                     "--out", str(tmp_path / out), *extra]) == 0
        return Tokenizer.load(tmp_path / out).vocab_size

    every_pair, frequent_only = train("a", "--min-frequency", "1"), train("b", "--min-frequency", "20")
    assert frequent_only < every_pair
    train("c", "--min-frequency", "1")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "c" / "tokenizer.json").read_bytes()

