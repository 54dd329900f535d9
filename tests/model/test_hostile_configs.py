"""config.json is untrusted input: every hostile value gives one LmforgeError naming the key, before anything is
allocated, through the production loader (checkpoint.load_model) and through the `lmforge` CLI.

The bank holds what a fuzz of 29 hostile config.json files found (issue 16: 1e9 layers grew memory for 70-89 s,
heads 0 or -4, float or string sizes, a JSON list, rope type yarn with bad values ended in tracebacks) and the
neighbours of each.
"""

import json
import math
import os

import pytest

from lmforge import checkpoint
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model import accounting, memory
from lmforge.model.config import MAX_SIZE, ModelConfig, preset
from tests.conftest import make_hf_model

INT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "max_position_embeddings")


def _set(**kw):
    return lambda c: c.update(kw)


def _drop(key):
    return lambda c: c.pop(key)


BANK = [
    # the file is not an object of settings
    ("json-list", "[1, 2, 3]", "must hold a JSON object"),
    ("json-string", '"llama"', "must hold a JSON object"),
    ("json-number", "42", "must hold a JSON object"),
    ("json-broken", '{"model_type": "llama",', "not valid JSON"),
    # sizes that would be allocated: huge, zero, negative, non-integer, wrong JSON type
    ("layers-1e9", _set(num_hidden_layers=10**9), "needs about .* free"),
    ("layers-1e9-float", _set(num_hidden_layers=1e9), "num_hidden_layers must be an integer"),
    ("layers-0", _set(num_hidden_layers=0), "num_hidden_layers must be an integer from 1"),
    ("heads-0", _set(num_attention_heads=0), "num_attention_heads must be an integer from 1"),
    ("heads--4", _set(num_attention_heads=-4), r"num_attention_heads must be an integer from 1 .* got -4"),
    ("heads-float", _set(num_attention_heads=4.0), r"num_attention_heads must be an integer .*\(float\)"),
    ("heads-string", _set(num_attention_heads="4"), r"num_attention_heads must be an integer .*\(str\)"),
    ("heads-bool", _set(num_attention_heads=True), r"num_attention_heads must be an integer .*\(bool\)"),
    ("kv-heads-0", _set(num_key_value_heads=0), "num_key_value_heads must be an integer from 1"),
    ("kv-heads-list", _set(num_key_value_heads=[2]), "num_key_value_heads must be an integer"),
    ("kv-heads-not-dividing", _set(num_key_value_heads=3), "num_attention_heads .4. must be a multiple of num_key_value_heads .3."),
    ("kv-heads-above-heads", _set(num_key_value_heads=8), "must be a multiple of num_key_value_heads .8."),
    ("hidden-float", _set(hidden_size=64.5), "hidden_size must be an integer"),
    ("hidden-string", _set(hidden_size="64"), "hidden_size must be an integer"),
    ("hidden-not-divisible", _set(hidden_size=66, head_dim=None), "hidden_size .66. must be divisible by num_attention_heads"),
    ("hidden-huge", _set(hidden_size=10**30), "hidden_size must be an integer from 1 to"),
    ("intermediate-negative", _set(intermediate_size=-128), "intermediate_size must be an integer from 1"),
    ("intermediate-null", _set(intermediate_size=None), "missing key 'intermediate_size'"),
    ("vocab-0", _set(vocab_size=0), "vocab_size must be an integer from 1"),
    ("vocab-negative", _set(vocab_size=-256), "vocab_size must be an integer from 1"),
    ("vocab-huge", _set(vocab_size=MAX_SIZE), "needs about .* free"),
    ("vocab-beyond-int32", _set(vocab_size=10**400), "vocab_size must be an integer from 1 to"),
    ("vocab-float", _set(vocab_size=256.0), "vocab_size must be an integer"),
    ("head-dim-float", _set(head_dim=15.5), "head_dim must be null or an integer"),
    ("head-dim-string", _set(head_dim="16"), "head_dim must be null or an integer"),
    ("head-dim-odd", _set(head_dim=15), r"head_dim \(15\) must be even"),
    ("head-dim-0", _set(head_dim=0), "head_dim must be null or an integer from 2"),
    ("context-0", _set(max_position_embeddings=0), "max_position_embeddings must be an integer from 1"),
    ("context-float", _set(max_position_embeddings=1e6), "max_position_embeddings must be an integer"),
    ("sliding-window-negative", _set(sliding_window=-1), "sliding_window must be null or an integer from 1"),
    # missing keys
    ("missing-vocab", _drop("vocab_size"), "missing key 'vocab_size'"),
    ("missing-heads", _drop("num_attention_heads"), "missing key 'num_attention_heads'"),
    ("missing-layers", _drop("num_hidden_layers"), "missing key 'num_hidden_layers'"),
    ("missing-model-type", _drop("model_type"), "model_type None is not supported"),
    ("model-type-list", _set(model_type=["llama"]), r"model_type \['llama'\] is not supported"),
    # floats and flags
    ("theta-negative", _set(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), "rope_theta must be a finite number above 1"),
    ("theta-string", _set(rope_theta="10000"), "rope_theta must be a finite number"),
    ("eps-0", _set(rms_norm_eps=0), "rms_norm_eps must be a number in"),
    ("eps-nan", _set(rms_norm_eps=math.nan), "rms_norm_eps must be a number in"),
    ("tie-string", _set(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    ("attention-bias-int", _set(attention_bias=1), "attention_bias must be true or false"),
    ("init-std-negative", _set(initializer_range=-0.02), "initializer_range must be a finite number >= 0"),
    # RoPE scaling: supported types with bad values, and types lmforge does not implement
    ("rope-dynamic", _set(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_type 'dynamic' is not supported"),
    ("rope-longrope", _set(rope_scaling={"type": "longrope", "factor": 2.0}), "rope_type 'longrope' is not supported"),
    ("rope-scaling-string", _set(rope_scaling="yarn"), "rope_scaling: must be a JSON object"),
    ("rope-parameters-list", _set(rope_parameters=["yarn"]), "rope_parameters must be a JSON object"),
    ("yarn-factor-string", _set(rope_parameters={"rope_type": "yarn", "factor": "4"}), "factor must be a finite number"),
    ("yarn-factor-negative", _set(rope_parameters={"rope_type": "yarn", "factor": -4.0}), "factor must be a finite number above 0"),
    ("yarn-beta-nan", _set(rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": math.nan}), "beta_fast must be a finite number"),
    ("yarn-original-float", _set(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32.5}), "original_max_position_embeddings must be a positive integer"),
    ("llama3-no-factor", _set(rope_parameters={"rope_type": "llama3"}), "factor is required for rope_type llama3"),
    ("llama3-equal-bands", _set(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}), "must exceed low_freq_factor"),
    ("linear-factor-0", _set(rope_scaling={"rope_type": "linear", "factor": 0}), "factor must be a finite number above 0"),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "m"
    make_hf_model("llama", d)
    return d


def _hostile_dir(good, tmp_path, change):
    d = tmp_path / "hostile"
    d.mkdir()
    os.symlink(good / "model.safetensors", d / "model.safetensors")
    if isinstance(change, str):
        (d / "config.json").write_text(change)
    else:
        cfg = json.loads((good / "config.json").read_text())
        change(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("change, message", [c[1:] for c in BANK], ids=[c[0] for c in BANK])
def test_hostile_config_is_one_clear_error(good, tmp_path, change, message):
    d = _hostile_dir(good, tmp_path, change)
    with pytest.raises(LmforgeError, match=message) as e:
        checkpoint.load_model(d)
    assert str(d / "config.json") in str(e.value) or str(d) in str(e.value)


def test_the_good_config_loads(good):
    """The bank's base is sound: what fails above fails for the change alone."""
    assert checkpoint.load_model(good).cfg.n_layers == 2


@pytest.mark.parametrize("name", ["layers-1e9", "heads--4", "json-list", "yarn-factor-string"])
def test_cli_prints_it_without_traceback(good, tmp_path, capsys, name):
    change = next(c[1] for c in BANK if c[0] == name)
    d = _hostile_dir(good, tmp_path, change)
    assert main(["generate", "--model", str(d), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err and "Traceback" not in err


def test_memory_refusal_names_the_need_and_what_is_free(good, tmp_path):
    d = _hostile_dir(good, tmp_path, _set(num_hidden_layers=10**9))
    with pytest.raises(LmforgeError) as e:
        checkpoint.load_model(d)
    cfg = ModelConfig(vocab_size=256, hidden_size=64, n_layers=10**9, n_heads=4, n_kv_heads=2,
                      intermediate_size=128)
    need = accounting.weight_bytes(cfg, 4) + cfg.n_layers * checkpoint._BYTES_PER_LAYER_OBJECTS
    msg = str(e.value)
    assert f"needs about {memory.format_bytes(need)} of memory on cpu" in msg
    assert f"{accounting.n_params(cfg):,} parameters" in msg and "1000000000 layers" in msg


def test_available_memory_is_what_proc_meminfo_says():
    free = memory.available_bytes("cpu")
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert free is not None and 0 < free <= total
    assert memory.available_bytes("meta") is None


def test_validate_names_cli_fields_for_yaml_configs():
    """The same gate serves pretrain's --model.* options, in their own spelling."""
    with pytest.raises(LmforgeError, match=r"model\.n_heads must be an integer from 1"):
        preset("test").replace(n_heads=0).validate()
    with pytest.raises(LmforgeError, match=r"model\.n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        preset("test").replace(n_kv_heads=3).validate()
    for name in ("test", "tiny", "smollm-135m", "qwen2.5-0.5b", "llama-3.1-8b", "mistral-7b"):
        preset(name).validate()


def test_kv_cache_that_cannot_fit_is_a_clear_error(good, tmp_path):
    """A tiny model declaring a huge context: a cache that cannot fit is refused with the fix, not torch's error;
    by default the engine serves the context its memory budget buys."""
    d = _hostile_dir(good, tmp_path, _set(max_position_embeddings=MAX_SIZE))
    model = checkpoint.load_model(d)  # weights are small: loading is fine
    from lmforge.inference.engine import KV_FREE_FRACTION, Engine
    from lmforge.model.transformer import KVCache

    with pytest.raises(LmforgeError) as e:
        KVCache(model.cfg, 4, MAX_SIZE)  # the model layer: all of it, allocated now
    msg = str(e.value)
    need = int(accounting.kv_cache_bytes(model.cfg, MAX_SIZE, 4, 4))
    assert f"4 sequence(s) of {MAX_SIZE} positions" in msg and f"({need} bytes)" in msg
    assert f"max_position_embeddings) is {MAX_SIZE}" in msg and "--max-len" in msg
    suggested = int(msg.split("(about ")[1].split()[0])
    free = memory.available_bytes("cpu")
    assert 0.5 < suggested * accounting.kv_cache_bytes(model.cfg, 1, 4, 4) / free < 2  # what is free, give or take
    with pytest.raises(LmforgeError) as e:
        Engine(model, max_batch=4, max_len=MAX_SIZE)  # the engine: a context asked for that its budget cannot buy
    msg = str(e.value)
    assert f"4 sequence(s) of {MAX_SIZE} positions" in msg and f"({need} bytes)" in msg and "--max-len" in msg
    suggested = int(msg.split("(about ")[1].split()[0])
    assert 0.5 < suggested * accounting.kv_cache_bytes(model.cfg, 1, 4, 4) / (KV_FREE_FRACTION * free) < 2
    with Engine(model, max_batch=4, max_len=64) as engine:  # the fix it names works
        assert engine.max_len == 64
    engine = Engine(model, max_batch=4)  # by default: what the budget buys, allocated as it is used
    assert 0.5 < engine.max_len / suggested < 2 and engine.cache.capacity == 256
    assert "grows on demand to 4 x" in engine.cache_summary()


def test_an_address_space_limit_counts_as_what_is_free():
    """Under `ulimit -v` (how the fuzz capped the loader at 4 GiB) the limit, not the machine's RAM, is what fits."""
    import resource
    import subprocess
    import sys

    cap = 4 << 30

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    code = "from lmforge.model import memory; print(memory.available_bytes('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], preexec_fn=limit, capture_output=True, text=True, check=True)
    assert 0 < int(out.stdout) < cap
