"""Each way a model directory can be wrong gives an LmforgeError that names the file, never a traceback."""

import json

import pytest

from lmforge import checkpoint
from lmforge.errors import LmforgeError
from tests.conftest import make_hf_model


@pytest.fixture
def good(tmp_path):
    make_hf_model("llama", tmp_path / "m")
    return tmp_path / "m"


def test_missing_directory(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nope")


def test_missing_config(good):
    (good / "config.json").unlink()
    with pytest.raises(LmforgeError, match="config.json is missing"):
        checkpoint.load_model(good)


def test_missing_weights(good):
    (good / "model.safetensors").unlink()
    with pytest.raises(LmforgeError, match="no model.safetensors"):
        checkpoint.load_model(good)


def test_unsupported_model_type(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmforgeError, match="model_type 'gpt2' is not supported"):
        checkpoint.load_model(good)


def test_shape_mismatch(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmforgeError, match="has shape .* but config.json implies"):
        checkpoint.load_model(good)


def test_truncated_weights(good):
    f = good / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(LmforgeError, match="model.safetensors cannot be read.*truncated"):
        checkpoint.load_model(good)


def test_pickle_only_refused(good):
    (good / "model.safetensors").rename(good / "pytorch_model.bin")
    with pytest.raises(LmforgeError, match="safetensors only"):
        checkpoint.load_model(good)


def test_eos_ids_list(good):
    (good / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert checkpoint.eos_ids(good) == [2, 7]


def test_atomic_save_never_leaves_partial(tmp_path, good):
    model = checkpoint.load_model(good)

    class Boom(Exception):
        pass

    class BadTokenizer:
        bos_id, eos_id, pad_id = 1, 2, None
        stop_ids = [2]

        def save(self, d):
            raise Boom()

    with pytest.raises(Boom):
        checkpoint.save_model(model, tmp_path / "out", tokenizer=BadTokenizer())
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob(".out.tmp-*")) == []
