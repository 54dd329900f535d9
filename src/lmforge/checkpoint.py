"""Hugging Face model directories <-> lmforge. The only module that knows HF's config.json keys.

A checkpoint is a directory that transformers' AutoModelForCausalLM / AutoTokenizer load as they are:
config.json, model.safetensors (or shards + model.safetensors.index.json), generation_config.json, tokenizer
files, plus lmforge.json (format version and lineage) and, for resumable training, trainer_state/.

config.json and adapter_config.json are untrusted input: each value's type and range is validated (with
ModelConfig.validate) before anything is sized from it, and load_model checks the memory a config implies against
what the machine has free, then the safetensors headers against the config, before it reads a tensor.

Writes are atomic: everything goes into a temporary sibling directory that is renamed into place, so a
killed run never leaves a checkpoint that looks whole but is not. Safetensors only; trainer state, which
holds optimizer dicts, uses torch.save and is read back with weights_only=True.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import LmforgeError
from lmforge.model.config import MAX_SIZE, ModelConfig, rope_type

if TYPE_CHECKING:
    import torch

    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

FORMAT_VERSION = 1
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


# ---- config.json ----------------------------------------------------------------------------------------
# ModelConfig field -> the config.json key that sets it, so that validation messages name what the user sees
HF_NAMES = {"model_type": "model_type", "vocab_size": "vocab_size", "hidden_size": "hidden_size",
            "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
            "intermediate_size": "intermediate_size", "max_seq_len": "max_position_embeddings",
            "head_dim": "head_dim", "rope_theta": "rope_theta", "rope_scaling": "rope_scaling",
            "norm_eps": "rms_norm_eps", "qkv_bias": "attention_bias", "tie_embeddings": "tie_word_embeddings",
            "sliding_window": "sliding_window", "init_std": "initializer_range"}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _given(hf: dict, key: str, default: Any = None) -> Any:
    """hf[key], or default when the key is absent or null (HF writes null for "use the default")."""
    v = hf.get(key)
    return default if v is None else v


def config_from_hf(hf: Any, source: str = "config.json") -> ModelConfig:
    """The ModelConfig a parsed config.json describes, validated; LmforgeError naming the key otherwise.

    config.json is untrusted input: every value's type and range is checked here and in ModelConfig.validate
    before anything is sized from it.
    """
    if not isinstance(hf, dict):
        kind = {list: "an array", str: "a string"}.get(type(hf), type(hf).__name__)
        raise LmforgeError(f"{source} must hold a JSON object of model settings (as save_pretrained writes), "
                           f"not {kind}")
    mt = hf.get("model_type")
    if not isinstance(mt, str) or mt not in SUPPORTED_TYPES:
        raise LmforgeError(f"{source}: model_type {mt!r} is not supported; lmforge loads {', '.join(SUPPORTED_TYPES)}")
    missing = [k for k in _REQUIRED if hf.get(k) is None]
    if missing:
        raise LmforgeError(f"{source}: missing key {missing[0]!r}; is this a Hugging Face causal-LM config?")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window", "tie_word_embeddings"):
        if hf.get(key) is not None and not isinstance(hf[key], bool):
            raise LmforgeError(f"{source}: {key} must be true or false, got {hf[key]!r}")
    if hf.get("mlp_bias") or (mt == "llama" and hf.get("attention_bias")):
        raise LmforgeError(f"{source}: attention_bias/mlp_bias on Llama output projections are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise LmforgeError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    names = HF_NAMES
    rope = hf.get("rope_parameters")  # transformers 5 nests rope settings here
    if rope is not None and not isinstance(rope, dict):
        raise LmforgeError(f"{source}: rope_parameters must be a JSON object, got {rope!r}")
    rope = dict(rope or {})
    theta = _given(hf, "rope_theta", _given(rope, "rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    scaling = hf.get("rope_scaling")
    if scaling is None and rope and rope_type(rope) != "default":
        scaling, names = rope, {**HF_NAMES, "rope_scaling": "rope_parameters"}
    sliding = hf.get("sliding_window")
    if mt == "qwen2" and not hf.get("use_sliding_window", False):
        sliding = None
    n_heads = hf["num_attention_heads"]
    cfg = ModelConfig(
        model_type=mt, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=n_heads, n_kv_heads=_given(hf, "num_key_value_heads", n_heads),
        intermediate_size=hf["intermediate_size"], max_seq_len=_given(hf, "max_position_embeddings", 2048),
        head_dim=hf.get("head_dim"), rope_theta=theta,
        rope_scaling=(dict(scaling) if isinstance(scaling, dict) else scaling) or None,
        norm_eps=_given(hf, "rms_norm_eps", 1e-6), qkv_bias=(mt == "qwen2") or bool(hf.get("attention_bias")),
        tie_embeddings=_given(hf, "tie_word_embeddings", False), sliding_window=sliding,
        init_std=_given(hf, "initializer_range", 0.02))
    cfg.validate(source, names)
    cfg.rope_theta = float(cfg.rope_theta)
    if cfg.head_dim == cfg.hidden_size // cfg.n_heads:
        cfg.head_dim = None
    return cfg


def config_to_hf(cfg: ModelConfig, dtype: str = "float32", bos_id: int | None = None,
                 eos_id: int | list[int] | None = None, pad_id: int | None = None) -> dict:
    hf: dict[str, Any] = {
        "architectures": [_ARCH[cfg.model_type]], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "torch_dtype": dtype, "use_cache": True,
    }
    if cfg.model_type == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    elif cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    elif cfg.model_type == "qwen2":
        hf.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                  max_window_layers=cfg.n_layers)
    return hf


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise LmforgeError(f"{path} is missing; a model directory needs config.json and model.safetensors")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path} is not valid JSON ({e}); the file is damaged, re-save or re-download it") from None


def _model_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise LmforgeError(f"model directory {p} does not exist (give the path of a Hugging Face model directory, "
                           f"e.g. runs/NAME/final)")
    return p


def load_config(path: str | Path) -> ModelConfig:
    p = _model_dir(path)
    return config_from_hf(_read_json(p / "config.json"), str(p / "config.json"))


# ---- weights --------------------------------------------------------------------------------------------
def _weight_files(p: Path) -> list[Path]:
    single = p / "model.safetensors"
    index = p / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (p / n).is_file()]
        if missing:
            raise LmforgeError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        return [p / n for n in names]
    if (p / "pytorch_model.bin").exists() or list(p.glob("pytorch_model-*.bin")):
        raise LmforgeError(f"{p} holds only pickled pytorch_model.bin weights; lmforge loads safetensors only. "
                           "Convert once with transformers: from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise LmforgeError(f"{p} has no model.safetensors (nor model.safetensors.index.json)")


def _damaged(f: Path, e: Exception) -> LmforgeError:
    return LmforgeError(f"{f} cannot be read ({e}); the file is truncated or damaged: re-save or re-download it")


# safetensors' header names for the dtypes a checkpoint may store
_HEADER_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _tensor_reader(files: list[Path], stack: contextlib.ExitStack
                   ) -> tuple[Callable[[str], torch.Tensor], Callable[[str], torch.dtype]]:
    """(read, dtype_of): a tensor read from whichever file holds it (one tensor at a time: nothing else is read),
    and a tensor's dtype from the file's header (no data read)."""
    from safetensors import SafetensorError, safe_open

    where: dict[str, tuple[Path, Any]] = {}
    for f in files:
        try:
            h = stack.enter_context(safe_open(str(f), framework="pt"))
            where.update((k, (f, h)) for k in h.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise _damaged(f, e) from None

    def read(name: str) -> torch.Tensor:
        f, h = where[name]
        try:
            return h.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise _damaged(f, e) from None

    def dtype_of(name: str) -> torch.dtype:
        import torch

        known = _HEADER_DTYPES.get(where[name][1].get_slice(name).get_dtype())
        return getattr(torch, known) if known else read(name).dtype

    return read, dtype_of


# Host memory the Python objects of one layer's modules take (measured: ~70 kB per Block on the meta device), so
# that a config with millions of tiny layers is refused for what building it costs, not only for its weights.
_BYTES_PER_LAYER_OBJECTS = 80_000
_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def _ensure_memory(cfg: ModelConfig, hf: dict, dtype: torch.dtype | None, device, where: Path) -> None:
    """Refuse, before reading or building anything, a model this machine cannot hold.

    Host: the tensors read from the files (at config.json's dtype; float32 if it names none), at most a converted
    copy when the target dtype differs, and the modules' Python objects. A CUDA device: the weights at the target
    dtype. The arithmetic is accounting.weight_bytes, the same the planner uses.
    """
    from lmforge.model import accounting, memory

    stored = _given(hf, "dtype", _given(hf, "torch_dtype", "float32"))
    file_bytes = _DTYPE_BYTES.get(stored, 4) if isinstance(stored, str) else 4
    target_bytes = dtype.itemsize if dtype is not None else file_bytes
    on_cuda = str(device).startswith("cuda")
    host = accounting.weight_bytes(cfg, file_bytes) + cfg.n_layers * _BYTES_PER_LAYER_OBJECTS
    if not on_cuda and target_bytes != file_bytes:
        host += accounting.weight_bytes(cfg, target_bytes)
    needs = [("cpu", host)] + ([(str(device), accounting.weight_bytes(cfg, target_bytes))] if on_cuda else [])
    for dev, need in needs:
        free = memory.available_bytes(dev)
        if free is not None and need > free:
            raise LmforgeError(
                f"{where}: this model needs about {memory.format_bytes(need)} of memory on {dev} to load "
                f"({accounting.n_params(cfg):,} parameters, {cfg.n_layers} layers), but {dev} has "
                f"{memory.format_bytes(free)} free; check config.json's sizes, free memory, or load it with a "
                "smaller dtype (--dtype bfloat16)")


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the Transformer for cfg holds and its shape, from a one-layer model on the meta device
    (so a config is checked against the files without building all its layers)."""
    import torch

    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        one = Transformer(cfg.replace(n_layers=1))
    shapes: dict[str, tuple[int, ...]] = {}
    for k, v in one.state_dict().items():
        if k.startswith("model.layers.0."):
            rest = k.removeprefix("model.layers.0.")
            for i in range(cfg.n_layers):
                shapes[f"model.layers.{i}.{rest}"] = tuple(v.shape)
        elif not (cfg.tie_embeddings and k == "lm_head.weight"):
            shapes[k] = tuple(v.shape)
    return shapes


def _file_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers alone (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    found[k] = tuple(h.get_slice(k).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise _damaged(f, e) from None
    return found


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               each_layer: Callable[[torch.nn.Module], None] | None = None) -> Transformer:
    """Load a HF directory of the Llama/Mistral/Qwen2 families into lmforge's Transformer (eval mode).

    In order, so that a bad directory costs nothing: config.json is validated, the memory it implies is checked
    against what the machine has free, the tensor names and shapes in the safetensors headers are checked against
    the config, and only then are tensors read and the model built (on the meta device, taking the read tensors
    as its parameters rather than copying them). `each_layer(block)` runs on every decoder block as soon as its
    weights are in (inference fuses and quantizes there, so an int8 load never holds the fp32 model).
    """
    import torch

    from lmforge.model.transformer import Transformer, rope_inv_freq

    p = _model_dir(path)
    hf = _read_json(p / "config.json")
    cfg = config_from_hf(hf, str(p / "config.json"))
    _ensure_memory(cfg, hf, dtype, device, p)
    files = _weight_files(p)
    where = files[0] if len(files) == 1 else p / "model.safetensors.index.json"
    expected = _expected_shapes(cfg)
    found = {k: v for k, v in _file_shapes(files).items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        found.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise LmforgeError(f"{where} lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:3]}; "
                           "the weights do not belong to this config.json")
    if unexpected:
        raise LmforgeError(f"{where} has {len(unexpected)} tensor(s) this architecture does not use, e.g. {unexpected[:3]}")
    for k, shape in expected.items():
        if found[k] != shape:
            raise LmforgeError(f"{where}: tensor {k} has shape {found[k]} but config.json implies "
                               f"{shape}; config and weights do not match")
    # built on the meta device and filled a layer at a time, each tensor read, converted and assigned alone: peak
    # memory is the model plus one tensor in the file's dtype; `each_layer` (quantization, for one) runs on every
    # layer once its weights are in, so the whole model never exists at this dtype
    with torch.device("meta"):
        model = Transformer(cfg)
    with contextlib.ExitStack() as stack:
        read, dtype_of = _tensor_reader(files, stack)
        target = dtype or dtype_of("model.embed_tokens.weight")

        def weights(names: list[str], prefix: str = "") -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): read(k).to(device=device, dtype=target) for k in names}

        layer_names = [[k for k in expected if k.startswith(f"model.layers.{i}.")] for i in range(cfg.n_layers)]
        model.load_state_dict(weights([k for k in expected if not k.startswith("model.layers.")]), strict=False,
                              assign=True)
        for i, layer in enumerate(model.model.layers):
            layer.load_state_dict(weights(layer_names[i], f"model.layers.{i}."), strict=False, assign=True)
            if each_layer is not None:
                each_layer(layer)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


def eos_ids(path: str | Path) -> list[int]:
    """Every id generation must stop on: generation_config.json's eos_token_id (int or list), else config.json's."""
    p = Path(path)
    for name in ("generation_config.json", "config.json"):
        f = p / name
        if f.is_file():
            eos = _read_json(f).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []


def load_tokenizer(path: str | Path) -> Tokenizer:
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.load(_model_dir(path))


def read_lineage(path: str | Path) -> dict:
    f = Path(path) / "lmforge.json"
    return _read_json(f) if f.is_file() else {}


def load_trainer_state(path: str | Path) -> dict | None:
    import torch

    f = Path(path) / "trainer_state" / "state.pt"
    if not f.is_file():
        return None
    try:
        return torch.load(f, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises several types for damaged files
        raise LmforgeError(f"{f} cannot be read ({type(e).__name__}: {e}); delete that checkpoint to resume from an "
                           "earlier one") from None


# ---- saving ---------------------------------------------------------------------------------------------
def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def atomic_dir(out_dir: str | Path):
    """Context manager: yields a temporary directory that replaces out_dir only when the block succeeds."""
    from contextlib import contextmanager

    @contextmanager
    def _cm():
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        try:
            yield tmp
            _fsync_tree(tmp)
            old = None
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
                os.replace(out, old)
            os.replace(tmp, out)
            dfd = os.open(out.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return _cm()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def save_model(model: Transformer, out_dir: str | Path, tokenizer: Tokenizer | None = None,
               lineage: dict | None = None, trainer_state: dict | None = None,
               generation: dict | None = None, state_dict: dict | None = None) -> Path:
    """Write `model` as a Hugging Face directory (atomically). Returns the directory.

    generation: extra generation_config.json keys. state_dict: weights to write instead of model's own
    (e.g. gathered from a sharded model); tied lm_head is dropped as HF expects.
    """
    import torch
    from safetensors.torch import save_file

    cfg = model.cfg
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items() if not k.endswith("inv_freq")}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    dtype = _dtype_name(sd["model.embed_tokens.weight"])
    bos = eos = pad = None
    eos_list: list[int] = []
    if tokenizer is not None:
        bos, eos, pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        eos_list = list(tokenizer.stop_ids)  # EOS and the template's end-of-turn token
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype, bos, eos, pad), indent=2) + "\n")
        gen = {"bos_token_id": bos, "eos_token_id": eos_list if len(eos_list) > 1 else eos, "pad_token_id": pad}
        gen.update(generation or {})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = {"format_version": FORMAT_VERSION, "lineage": lineage or {}}
        (tmp / "lmforge.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if trainer_state is not None:
            (tmp / "trainer_state").mkdir()
            torch.save(trainer_state, tmp / "trainer_state" / "state.pt")
    return out


# ---- what a directory holds (run directories are training/rundir.py's) ------------------------------------
def is_complete(path: str | Path) -> bool:
    """The files of a model directory are there: config.json, lmforge.json and the weights (whole, as writes are
    atomic; whether they load is load_model's question)."""
    p = Path(path)
    return all((p / n).is_file() for n in ("config.json", "lmforge.json")) and bool(
        (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())


# ---- LoRA adapters as PEFT directories (appended by the finetune stage) ---------------------------------
# A LoRA adapter is a PEFT adapter directory: adapter_config.json + adapter_model.safetensors whose keys are
# "base_model.model.<module>.lora_A.weight" / "...lora_B.weight" (PEFT strips its adapter name "default" when
# saving). peft.PeftModel.from_pretrained(transformers_model, dir) loads what save_adapter writes, and load_adapter
# reads what PEFT writes. lmforge.json beside them holds the lineage, as in a model directory.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def is_adapter_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and (p / ADAPTER_WEIGHTS).is_file()


def read_adapter_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise LmforgeError(f"adapter directory {p} does not exist (give a PEFT adapter directory, e.g. runs/NAME/adapter)")
    cfg = _read_json(p / ADAPTER_CONFIG)
    where = p / ADAPTER_CONFIG
    if not isinstance(cfg, dict):
        raise LmforgeError(f"{where} must hold a JSON object (as PEFT's save_pretrained writes), got {cfg!r:.60}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LmforgeError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported; lmforge loads LoRA adapters")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise LmforgeError(f"{where}: {key}={bad} is not supported; merge the adapter with PEFT first "
                               "(model.merge_and_unload().save_pretrained(dir))")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise LmforgeError(f"{where}: adapters that also train biases or whole modules (bias / modules_to_save) are "
                           "not supported; merge it with PEFT first (merge_and_unload) and load the full model")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise LmforgeError(f"{where}: per-module rank_pattern/alpha_pattern is not supported")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_SIZE:
        raise LmforgeError(f"{where}: 'r' (the LoRA rank) must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if not _finite(alpha) or alpha <= 0:
        raise LmforgeError(f"{where}: lora_alpha must be a finite positive number (the update is scaled by "
                           f"lora_alpha / r), got {alpha!r}")
    dropout = _given(cfg, "lora_dropout", 0.0)
    if not _finite(dropout) or not 0 <= dropout < 1:
        raise LmforgeError(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if cfg.get("use_rslora") is not None and not isinstance(cfg["use_rslora"], bool):
        raise LmforgeError(f"{where}: use_rslora must be true or false, got {cfg['use_rslora']!r}")
    layers = cfg.get("layers_to_transform")
    if layers is not None:
        items = [layers] if not isinstance(layers, list) else layers
        if not items or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
            raise LmforgeError(f"{where}: layers_to_transform must be null, a layer index or a list of them, "
                               f"got {layers!r}")
    _peft_targets(cfg, str(where))
    return cfg


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _peft_targets(cfg: dict, where: str) -> list[str]:
    from lmforge.model.lora import TARGET_NAMES

    targets = cfg.get("target_modules")
    if targets in (None, "all-linear"):
        targets = list(TARGET_NAMES.values())
    elif isinstance(targets, str):  # PEFT allows a regex over full module names
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise LmforgeError(f"{where}: target_modules {targets!r} is not a valid regular expression ({e})") from None
        targets = [t for t in TARGET_NAMES.values() if pattern.search(f"model.layers.0.self_attn.{t}")
                   or pattern.search(f"model.layers.0.mlp.{t}")]
    if not isinstance(targets, list) or not targets:
        raise LmforgeError(f"{where}: target_modules must be a list of module names, got {cfg.get('target_modules')!r}")
    bad = [t for t in targets if t not in TARGET_NAMES.values()]
    if bad:
        raise LmforgeError(f"{where}: target module(s) {bad} are not Llama projections lmforge can adapt "
                           f"({', '.join(TARGET_NAMES.values())})")
    return targets


def save_adapter(model: Transformer, out_dir: str | Path, base_model_name_or_path: str | Path | None = None,
                 lineage: dict | None = None, trainer_state: dict | None = None,
                 tokenizer: Tokenizer | None = None) -> Path:
    """Write the model's LoRA adapter as a PEFT adapter directory (atomically). Returns the directory."""
    import torch
    from safetensors.torch import save_file

    from lmforge.model.lora import lora_settings, lora_state_dict

    s = lora_settings(model)
    tensors = {}
    for k, v in lora_state_dict(model).items():
        module, which = k.rsplit(".", 1)  # "...q_proj", "lora_A"
        tensors[f"{_PEFT_PREFIX}{module}.{which}.weight"] = v.detach().to("cpu").contiguous()
    all_layers = s["layers"] == list(range(model.cfg.n_layers))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": str(base_model_name_or_path) if base_model_name_or_path is not None else None,
        "revision": None, "inference_mode": True, "r": s["rank"], "lora_alpha": s["alpha"],
        "lora_dropout": s["dropout"], "target_modules": s["targets"], "bias": "none", "fan_in_fan_out": False,
        "use_rslora": s["use_rslora"], "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None if all_layers else s["layers"], "layers_pattern": None if all_layers else "layers",
        "rank_pattern": {}, "alpha_pattern": {},
    }
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        meta = {"format_version": FORMAT_VERSION, "kind": "lora-adapter", "lineage": lineage or {}}
        (tmp / "lmforge.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if trainer_state is not None:
            (tmp / "trainer_state").mkdir()
            torch.save(trainer_state, tmp / "trainer_state" / "state.pt")
    return out


def load_adapter(model: Transformer, adapter_dir: str | Path) -> Transformer:
    """Add the PEFT LoRA adapter in adapter_dir to `model` (in place; returns it), frozen base, eval as it was.

    Serve it as is, or call lmforge.model.lora.merge_lora(model) to fold it into the weights.
    """
    from lmforge.model.lora import apply_lora, load_lora_state_dict

    p = Path(adapter_dir)
    cfg, state = read_adapter(p)
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    where = p / ADAPTER_CONFIG
    n_layers = model.cfg.n_layers
    if layers is not None and max(layers) >= n_layers:
        raise LmforgeError(f"{where}: layers_to_transform names layer {max(layers)}, but the base model has "
                           f"{n_layers} layers (0..{n_layers - 1}); was the adapter trained on another base?")
    # The rank in the config sizes what apply_lora allocates: it must be the rank the tensors have.
    for k, t in state.items():
        if t.dim() != 2 or t.shape[0 if k.endswith(".lora_A") else 1] != cfg["r"]:
            raise LmforgeError(f"{where}: r is {cfg['r']}, but {p / ADAPTER_WEIGHTS} holds {k} of shape "
                               f"{tuple(t.shape)}; the config does not belong to these weights")
    alpha = cfg.get("lora_alpha", 8)
    apply_lora(model, _peft_targets(cfg, str(p / ADAPTER_CONFIG)), rank=cfg["r"], alpha=alpha, dropout=0.0,
               use_rslora=bool(cfg.get("use_rslora")), layers=layers)
    load_lora_state_dict(model, state, source=str(p / ADAPTER_WEIGHTS))
    return model


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict]:
    """(adapter_config.json, LoRA tensors in lmforge names: '<module>.lora_A' / '<module>.lora_B')."""
    p = Path(adapter_dir)
    cfg = read_adapter_config(p)
    f = p / ADAPTER_WEIGHTS
    if not f.is_file():
        raise LmforgeError(f"{p} has no {ADAPTER_WEIGHTS}; a PEFT adapter directory holds {ADAPTER_CONFIG} and "
                           f"{ADAPTER_WEIGHTS} (pickled adapter_model.bin is not loaded)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise _damaged(f, e) from None
    state = {}
    for k, v in raw.items():
        name = k.removeprefix(_PEFT_PREFIX).replace(".default.", ".")  # older PEFT kept the adapter name
        if not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise LmforgeError(f"{f}: tensor {k!r} is not a LoRA A/B weight; lmforge loads plain LoRA adapters only")
        state[name.removesuffix(".weight")] = v
    return cfg, state
