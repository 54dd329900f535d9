"""`lmforge rag index` / `lmforge rag search` as a user runs them (the embedder is the shared real one)."""

import json

import pytest

from lmforge.cli import main
from lmforge.rag import embed
from tests.rag.shared import write_docs


@pytest.fixture(autouse=True)
def shared_embedder(minilm, monkeypatch):
    monkeypatch.setattr(embed.Embedder, "load", classmethod(lambda cls, name=None: minilm))


def test_index_update_search(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_docs(tmp_path / "docs")
    assert main(["rag", "index", "--docs", "docs", "--out", "indexes/my"]) == 0
    out = capsys.readouterr().out
    assert "3 new, 0 changed, 0 unchanged" in out
    assert main(["rag", "index", "--docs", "docs", "--out", "indexes/my"]) == 0
    assert "0 new, 0 changed, 3 unchanged" in capsys.readouterr().out
    (tmp_path / "extra.md").write_text("Penguins cannot fly but swim very well.")
    assert main(["rag", "index", "--docs", "docs,extra.md", "--out", "indexes/my"]) == 0
    assert "1 new, 0 changed, 3 unchanged" in capsys.readouterr().out
    assert main(["rag", "search", "--index", "indexes/my", "birds that swim", "--top-k", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hits"][0]["source"] == "extra.md" and len(result["hits"]) == 2
    assert main(["rag", "search", "--index", "indexes/my", "Saturn V rocket"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1] ") and "docs/rockets.txt:0-" in out


def test_cli_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["rag", "search", "--index", "nowhere", "q"]) == 2
    assert "not a RAG index" in capsys.readouterr().err
    assert main(["rag", "index", "--docs", "missing", "--out", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    write_docs(tmp_path / "docs")
    assert main(["rag", "index", "--docs", "docs", "--out", "ix"]) == 0
    assert main(["rag", "index", "--docs", "docs", "--out", "ix", "--chunk-chars", "300"]) == 2
    assert "chunk-chars 800" in capsys.readouterr().err
    (tmp_path / "notindex").mkdir()
    (tmp_path / "notindex" / "f").write_text("x")
    assert main(["rag", "index", "--docs", "docs", "--out", "notindex"]) == 2
    assert "not a RAG index" in capsys.readouterr().err
