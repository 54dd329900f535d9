"""Corpus reading (files, folders, globs, jsonl, non-UTF-8, the built-in stdlib corpus) and token shards:
writer/reader round trip across shard boundaries, the loader's order, resume and data-parallel slicing."""

import json

import numpy as np
import pytest
import torch

from lmforge.data import IGNORE_INDEX, corpus
from lmforge.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    ShardWriter,
    TokenLoader,
    TokenShards,
    dtype_for_vocab,
    read_manifest,
    validation_batches,
)
from lmforge.errors import LmforgeError


def test_resolve_files_folders_globs_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# beta")
    (tmp_path / "sub" / "c.py").write_text("x = 1\n")
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\0")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n"
                                      + "not json\n" + json.dumps({"other": 1}) + "\n")
    files = corpus.resolve([str(tmp_path / "a.txt"), str(tmp_path / "sub"), str(tmp_path / "*.jsonl"),
                            str(tmp_path / "a.txt")])
    assert [f.name for f in files] == ["a.txt", "b.md", "c.py", "d.jsonl"]
    stats = corpus.CorpusStats()
    docs = [d for _, d in corpus.read_documents(files, stats)]
    assert docs == ["alpha text", "# beta", "x = 1\n", "one", "two"]
    assert stats.documents == 5 and stats.files == 4 and stats.skipped_lines == 2
    for bad in ([], [str(tmp_path / "missing.txt")], [str(tmp_path / "nothing*.txt")],
                [str(tmp_path / "sub" / "skip.bin")]):
        with pytest.raises(LmforgeError):
            corpus.resolve(bad)


def test_non_utf8_is_replaced_and_counted(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 ok".encode("latin-1") + " \ufffd".encode())  # a latin-1 byte, then a real U+FFFD
    stats = corpus.CorpusStats()
    (doc,) = [d for _, d in corpus.read_documents([f], stats)]
    assert doc == "caf\ufffd ok \ufffd"
    assert stats.replaced_files == [str(f)] and stats.replacement_chars == 1  # the genuine U+FFFD is not counted


def test_builtin_corpus_is_stdlib_without_tests_and_deterministic():
    files = corpus.builtin_files(max_bytes=300_000)
    assert files == corpus.builtin_files(max_bytes=300_000)
    root = corpus.stdlib_root()
    assert all(f.suffix == ".py" and root in f.parents for f in files)
    assert not any({"test", "tests", "site-packages"} & set(f.relative_to(root).parts) for f in files)
    assert 200_000 < sum(f.stat().st_size for f in files) <= 300_000
    assert len({f.parent for f in files}) > 3  # spread over the library, not one package


def _write_split(d, split, tokens, shard_tokens, dtype):
    w = ShardWriter(d, split, dtype, shard_tokens=shard_tokens)
    for chunk in np.array_split(tokens, 7):
        w.write(chunk)
    return {"shards": w.close(), "tokens": w.tokens, "bytes": 3 * w.tokens}


def _prepared(tmp_path, n=1000, vocab=70000, shard_tokens=128):
    tokens = np.arange(n) % vocab
    dt = dtype_for_vocab(vocab)
    splits = {"train": _write_split(tmp_path, "train", tokens, shard_tokens, dt),
              "val": _write_split(tmp_path, "val", tokens[:100], shard_tokens, dt)}
    (tmp_path / MANIFEST).write_text(json.dumps({"format": FORMAT_VERSION, "dtype": dt.name, "splits": splits}))
    return tokens


def test_dtype_choice():
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.uint32


def test_shards_round_trip_across_boundaries(tmp_path):
    tokens = _prepared(tmp_path)
    s = TokenShards(tmp_path, "train")
    assert len(s) == 1000 and len(s.arrays) == 8 and s.tokens_per_byte == pytest.approx(1 / 3)
    assert (s.read(0, 1000) == tokens).all()
    assert (s.read(120, 300) == tokens[120:300]).all()
    assert (tmp_path / "train-00000.bin").stat().st_size == 128 * 4  # uint32 for a 70k vocabulary


def test_loader_order_resume_and_rank_slices(tmp_path):
    _prepared(tmp_path)
    s = TokenShards(tmp_path, "train")
    a = TokenLoader(s, seq_len=16, batch_size=4, seed=3)
    assert a.n_windows == (1000 - 1) // 16
    x, y = a.next_batch()
    assert x.shape == (4, 16) and x.dtype == torch.int64 and (x[:, 1:] == y[:, :-1]).all()
    starts = [int(r[0]) for r in x]
    assert len(set(starts)) == 4 and all(v % 16 == 0 for v in starts)  # aligned, distinct windows
    for _ in range(30):  # crosses into epoch 2 (62 windows/epoch)
        a.next_batch()
    b = TokenLoader(s, seq_len=16, batch_size=4, seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    # an epoch visits every window once
    c = TokenLoader(s, seq_len=16, batch_size=1, seed=3)
    seen = [int(c.next_batch()[0][0, 0]) // 16 for _ in range(c.n_windows)]
    assert sorted(seen) == list(range(c.n_windows))
    # two ranks of batch 2 read exactly the windows one process of batch 4 reads
    one = TokenLoader(s, seq_len=16, batch_size=4, seed=5)
    r0 = TokenLoader(s, seq_len=16, batch_size=2, seed=5, rank=0, world_size=2)
    r1 = TokenLoader(s, seq_len=16, batch_size=2, seed=5, rank=1, world_size=2)
    for _ in range(20):
        assert torch.equal(one.next_batch()[0], torch.cat([r0.next_batch()[0], r1.next_batch()[0]]))
    with pytest.raises(LmforgeError, match="seq_len"):
        TokenLoader(s, seq_len=8, batch_size=4, seed=5).load_state_dict(one.state_dict())
    with pytest.raises(LmforgeError, match="fewer than"):
        TokenLoader(TokenShards(tmp_path, "val"), seq_len=100, batch_size=1)


def test_validation_batches_in_order_and_shared_by_ranks(tmp_path):
    _prepared(tmp_path)
    val = TokenShards(tmp_path, "val")  # 100 tokens: 6 windows of 16 (+1)
    one = list(validation_batches(val, seq_len=16, batch_size=4, eval_tokens=80))  # 5 windows
    assert [x.shape[0] for x, _ in one] == [4, 1]
    x = torch.cat([x for x, _ in one])
    assert [int(r[0]) for r in x] == [0, 16, 32, 48, 64]  # the first windows, in order, every run the same
    assert all((xb[:, 1:] == yb[:, :-1]).all() for xb, yb in one)  # targets are the inputs shifted by one
    # two ranks: the same windows between them, the same number of batches each, the short rank's extra row ignored
    r0, r1 = (list(validation_batches(val, 16, 2, 80, rank=r, world_size=2)) for r in (0, 1))
    assert len(r0) == len(r1) == 2
    starts = [int(row[0]) for x, y in r0 + r1 for row, t in zip(x, y) if (t != IGNORE_INDEX).any()]
    assert sorted(starts) == [0, 16, 32, 48, 64]
    assert (r1[-1][1][-1] == IGNORE_INDEX).all()
    # a split shorter than seq_len gives one shorter window
    assert list(validation_batches(val, seq_len=500, batch_size=2, eval_tokens=10**6))[0][0].shape == (1, 99)


def test_missing_or_damaged_data_dirs(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(LmforgeError, match="lmforge prepare"):
        TokenShards(tmp_path, "train")
    _prepared(tmp_path)
    (tmp_path / "train-00001.bin").write_bytes(b"12")
    with pytest.raises(LmforgeError, match="wrong size"):
        TokenShards(tmp_path, "train")


def test_data_tables_are_not_python_to_learn():
    table = "name2codepoint = {\n" + "".join(f"    'e{i}': 0x{i:04x},\n" for i in range(50)) + "}\n"
    code = "def f(x):\n    '''Double.'''\n    return 2 * x\n\nclass A:\n    pass\n"
    assert corpus.is_data_table(table) and not corpus.is_data_table(code) and not corpus.is_data_table("")
    names = {f.name for f in corpus.builtin_files(max_bytes=None)}
    assert "entities.py" not in names and not any(n.startswith("_sysconfigdata") for n in names)
