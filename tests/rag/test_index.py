"""The index with the real MiniLM embedder: build, search, update in place, reopen, errors."""

import json

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.rag.index import Index, find_documents
from tests.rag.shared import write_docs


@pytest.fixture
def built(tmp_path, minilm, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_docs(tmp_path / "docs")
    index = Index.create(tmp_path / "idx", minilm)
    stats = index.add_documents(find_documents(["docs"]))
    index.save()
    return index, stats


def test_build_and_search_finds_the_right_document(built, minilm):
    index, stats = built
    assert stats["files_added"] == 3 and stats["chunks_added"] == len(index) >= 3
    hits = index.search("Which rocket took astronauts to the Moon?", top_k=3)
    assert hits[0].source == "docs/rockets.txt" and "Saturn V" in hits[0].text
    assert [h.rank for h in hits] == [1, 2, 3]
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    # the score is the cosine similarity of the two embeddings, computed directly
    q, c = minilm.encode(["Which rocket took astronauts to the Moon?", hits[0].text])
    assert abs(float(q @ c) - hits[0].score) < 1e-4
    assert abs(np.linalg.norm(q) - 1) < 1e-5
    assert index.search("a function computing Fibonacci numbers", 1)[0].source == "docs/code/fib.py"
    assert len(index.search("cats", top_k=50)) == len(index)  # top_k beyond the index returns everything


def test_files_on_disk_are_json_and_faiss_and_reopen(built, minilm):
    index, _ = built
    names = sorted(p.name for p in index.path.iterdir())
    assert names == ["chunks-1.jsonl", "index-1.faiss", "manifest.json"]
    manifest = json.loads((index.path / "manifest.json").read_text())
    assert manifest["embedder"] == {"name": "all-MiniLM-L6-v2", "dim": 384, "max_length": 256}
    assert set(manifest["files"]) == {"docs/cats.md", "docs/rockets.txt", "docs/code/fib.py"}
    for line in (index.path / "chunks-1.jsonl").read_text().splitlines():
        rec = json.loads(line)
        src = (index.path.parent / rec["source"]).read_text()
        assert src[rec["start"]:rec["end"]] == rec["text"]
    again = Index.open(index.path, embedder=minilm)
    a = index.search("clowder of cats", 3)
    b = again.search("clowder of cats", 3)
    assert [(h.id, round(h.score, 5)) for h in a] == [(h.id, round(h.score, 5)) for h in b]


def test_update_embeds_only_new_and_changed_files(built, minilm, tmp_path):
    index, _ = built
    (tmp_path / "docs" / "cats.md").write_text("Cats purr when they are content. Whiskers help cats feel their way.\n")
    (tmp_path / "docs" / "whales.txt").write_text("Blue whales are the largest animals that ever lived.\n")
    embedded = []
    real_encode = minilm.encode

    def counting_encode(texts, batch_size=32):
        embedded.extend(texts)
        return real_encode(texts, batch_size)

    reopened = Index.open(index.path, embedder=minilm)
    reopened.embedder.encode = counting_encode
    try:
        stats = reopened.add_documents(find_documents(["docs"]))
    finally:
        del minilm.encode
    reopened.save()
    assert stats["files_added"] == 1 and stats["files_changed"] == 1 and stats["files_unchanged"] == 2
    assert all("Saturn" not in t and "fibonacci" not in t for t in embedded)  # unchanged files not re-embedded
    assert len(embedded) == stats["chunks_added"] == 2
    assert sorted(p.name for p in index.path.iterdir()) == ["chunks-2.jsonl", "index-2.faiss", "manifest.json"]
    final = Index.open(index.path, embedder=minilm)
    assert final.search("largest animal", 1)[0].source == "docs/whales.txt"
    assert not any("clowder" in c["text"] for c in final.chunks.values())  # the old cats text is gone
    assert final.faiss_index.ntotal == len(final.chunks)
    # prune drops files that vanished
    (tmp_path / "docs" / "whales.txt").unlink()
    stats = final.add_documents(find_documents(["docs"]), prune=True)
    assert stats["files_removed"] == 1 and "docs/whales.txt" not in final.files
    assert all(h.source != "docs/whales.txt" for h in final.search("largest animal", 10))


def test_errors(tmp_path, minilm):
    with pytest.raises(LmforgeError, match="not a RAG index"):
        Index.open(tmp_path)
    with pytest.raises(LmforgeError, match="does not exist"):
        find_documents([str(tmp_path / "nope")])
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    index = Index.create(tmp_path / "i", minilm)
    with pytest.raises(LmforgeError, match="binary"):
        index.add_documents([tmp_path / "bin.txt"])
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LmforgeError, match="UTF-8"):
        index.add_documents([tmp_path / "latin.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="no text files"):
        find_documents([str(tmp_path / "empty")])


def test_chunks_fit_the_embedder_window(tmp_path, minilm):
    # dense code: 800 characters here are far more than MiniLM's 256 word pieces
    text = "\n".join(" ".join(f"v{i}x{j}q = f{j}(z{i * j}%{j})" for j in range(8)) for i in range(40))
    (tmp_path / "dense.py").write_text(text)
    index = Index.create(tmp_path / "idx", minilm)
    index.add_documents([tmp_path / "dense.py"])
    chunks = list(index.chunks.values())
    assert len(chunks) > 10
    assert max(minilm.count_tokens([c["text"] for c in chunks])) <= minilm.max_length
    for c in chunks:
        assert text[c["start"]:c["end"]] == c["text"]


def test_concurrent_searches_agree_with_sequential(built):
    import threading

    index, _ = built
    queries = ["rockets and the Moon", "sleeping cats", "Fibonacci numbers", "propellants"]
    expected = {q: [h.id for h in index.search(q, 2)] for q in queries}
    got, errors = {}, []

    def worker(q):
        try:
            got[q] = [h.id for h in index.search(q, 2)]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(q,)) for q in queries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == expected
