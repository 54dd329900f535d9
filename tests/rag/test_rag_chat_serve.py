"""RAG reaches users: `lmforge chat --rag` cites its sources, and `lmforge serve --rag` returns them beside
OpenAI's fields, streaming or not, through the official openai client against a real loopback server."""

import io

import httpx
import pytest

from tests.inference.tiny import make_model_dir
from tests.rag.shared import embedder, write_docs


@pytest.fixture(scope="module")
def rag_setup(tmp_path_factory):
    from lmforge.rag.index import Index, find_documents

    root = tmp_path_factory.mktemp("ragchat")
    docs = write_docs(root / "docs")
    index = Index.create(root / "index", embedder())
    index.add_documents(find_documents([str(docs)]))
    index.save()
    return make_model_dir(root / "model", max_seq_len=2048), root / "index"


def test_chat_repl_cites_sources(rag_setup, capsys):
    from lmforge.checkpoint import load_model, load_tokenizer
    from lmforge.inference.chat import ChatConfig, repl
    from lmforge.inference.engine import Engine
    from lmforge.inference.sampling import SamplingOptions
    from lmforge.rag.chat import make_augment

    model_dir, index_dir = rag_setup
    tok = load_tokenizer(model_dir)
    seen = []
    augment = make_augment(str(index_dir), tok, top_k=2)

    def spy(messages, budget):
        out, sources = augment(messages, budget)
        seen.append(out[-1]["content"])
        return out, sources

    cfg = ChatConfig(model=str(model_dir), sampling=SamplingOptions(temperature=0), max_new_tokens=4, stats=False)
    with Engine(load_model(model_dir), max_batch=1) as engine:
        repl(engine, tok, cfg, stdin=io.StringIO("Which rocket carried astronauts to the Moon?\n"),
             stdout=io.StringIO(), augment=spy)
    assert "Saturn V" in seen[0] and "Question: Which rocket" in seen[0]
    err = capsys.readouterr().err
    assert "sources:" in err and "rockets.txt" in err


def test_chat_verb_rag_top_k_is_retrievals_own(rag_setup, monkeypatch, capsys):
    from lmforge.cli import main

    model_dir, index_dir = rag_setup
    monkeypatch.setattr("sys.stdin", io.StringIO("Which rocket carried astronauts to the Moon?\n"))
    assert main(["chat", "--model", str(model_dir), "--rag", str(index_dir), "--rag-top-k", "1", "--top-k", "3",
                 "--temperature", "0", "--max-new-tokens", "2", "--no-stats", "--no-compile"]) == 0
    err = capsys.readouterr().err
    cited = [line for line in err.splitlines() if line.startswith("  [")]
    assert len(cited) == 1 and "rockets.txt" in cited[0]  # one chunk, as --rag-top-k asked; --top-k is sampling's


def test_serve_returns_sources(rag_setup):
    import openai

    from lmforge.serve.app import create_app
    from lmforge.serve.server import make_loader, parse_specs, rag_factories
    from lmforge.serve.state import EngineOptions
    from tests.serve.conftest import LiveServer

    model_dir, index_dir = rag_setup
    specs = parse_specs([f"tiny={model_dir}"], [])
    app = create_app(loader=make_loader(specs, "float32", None), engine=EngineOptions(max_batch=2),
                     rag=rag_factories([f"tiny={index_dir}"], ["tiny"], 2))
    server = LiveServer(app).start()
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        question = [{"role": "user", "content": "How many hours a day do cats sleep?"}]
        reply = client.chat.completions.create(model="tiny", messages=question, max_tokens=4, temperature=0)
        sources = reply.model_extra["sources"]
        assert sources and sources[0]["source"].endswith("cats.md") and sources[0]["n"] == 1
        assert reply.usage.prompt_tokens > 40  # the sources went into the prompt
        stream = client.chat.completions.create(model="tiny", messages=question, max_tokens=4, stream=True)
        first = next(iter(stream))
        assert first.model_extra["sources"][0]["source"].endswith("cats.md")
        bad = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
        assert bad.status_code == 400
    finally:
        server.stop()


def test_serve_rag_spec_errors(rag_setup, tmp_path):
    from lmforge.errors import LmforgeError
    from lmforge.serve.server import rag_factories

    _, index_dir = rag_setup
    with pytest.raises(LmforgeError, match="NAME=INDEX_DIR"):
        rag_factories(["tiny"], ["tiny"], 2)
    with pytest.raises(LmforgeError, match="no served model is named 'other'"):
        rag_factories([f"other={index_dir}"], ["tiny"], 2)
    with pytest.raises(LmforgeError, match="is not a RAG index"):
        rag_factories([f"tiny={tmp_path}"], ["tiny"], 2)
