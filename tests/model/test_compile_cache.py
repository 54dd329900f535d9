"""model/compile_cache.py: one directory per compile key under the lmforge root, callable with no key, and a
TORCHINDUCTOR_CACHE_DIR the user exported is kept."""

import json
import os

import torch

from lmforge.model import compile_cache as cc


def test_a_directory_per_key_and_one_without(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_COMPILE_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    a = cc.use_compile_cache(kind="decode", dtype="float32", quantize="none", model={"hidden": 64})
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(a)
    assert a.parent == tmp_path / f"torch-{torch.__version__}" and a.name.startswith("decode-float32-none-")
    assert json.loads((a / "key.json").read_text())["model"] == {"hidden": 64}
    b = cc.use_compile_cache(kind="decode", dtype="float32", quantize="none", model={"hidden": 128})
    assert b != a and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(b)  # a later key moves it (ours, not the user's)
    plain = cc.use_compile_cache()
    assert plain.is_dir() and plain.parent == a.parent and plain not in (a, b)
    assert cc.use_compile_cache() == plain
    assert torch._inductor.config.fx_graph_cache and torch._functorch.config.enable_autograd_cache


def test_a_user_set_inductor_cache_dir_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_COMPILE_CACHE", str(tmp_path / "ours"))
    mine = tmp_path / "mine"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(mine))
    assert cc.use_compile_cache(kind="decode", dtype="bfloat16") == mine and mine.is_dir()
    assert cc.use_compile_cache() == mine
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(mine) and not (tmp_path / "ours").exists()


def test_inductors_own_default_is_not_taken_for_the_users(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("LMFORGE_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what Inductor writes back once used
    assert cc.use_compile_cache(kind="train").parent == tmp_path / f"torch-{torch.__version__}"
