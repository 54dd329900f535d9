"""GGUF files (llama.cpp's format) <-> lmforge: llama.cpp's tensor and metadata names, its quantization types and
its tokenizer description. The only module that knows them; it sits beside checkpoint.py, which knows HF's.

Owns `write_gguf` (a Transformer + its Tokenizer -> one .gguf file, written atomically), `read_gguf` (a .gguf file
-> ModelConfig, float32 weights in lmforge/HF names, a Tokenizer and the stop ids) and `pre_tokenizer_name`.
Leaves the byte layout and the block quantizers to the `gguf` package (llama.cpp's own Python side), the HF
directory to checkpoint.py, and the commands (`lmforge export gguf|ollama`, `lmforge import gguf`, `--model
foo.gguf`) to inference/convert.py.

Decisions, and why:
- Architectures: lmforge's llama and mistral models are written as GGUF architecture `llama` (llama.cpp has no
  separate Mistral graph), qwen2 as `qwen2`. llama.cpp's llama graph rotates adjacent pairs (2i, 2i+1) of each
  head while HF's weights are laid out for rotate-half (i, i + D/2), so the q and k rows (and biases) of llama
  models are permuted per head on the way out and back on the way in. Its qwen2 graph uses rotate-half itself:
  no permutation there.
- Tensor types: 1-D tensors and norms stay F32 (llama.cpp's kernels read them as F32), every matrix gets the
  requested type. A matrix whose rows are not a multiple of the 32-value block cannot be block-quantized; it
  falls back to F16, as llama.cpp's converter does, and the report lists it. K-quants (Q4_K_M, ...) need
  llama.cpp's quantizer (importance-weighted mixes of types); inference/convert.py runs it when installed.
- Llama 3.1 RoPE scaling is written as llama.cpp's `rope_freqs` tensor: the per-frequency divisors, computed
  from lmforge's own rotary code (unscaled / scaled inverse frequencies) so both sides rotate alike. On import
  the divisors are turned back into a `llama3` rope_scaling dict and checked against the tensor.
- Sliding window: stored as `{arch}.attention.sliding_window`. llama.cpp's llama and qwen2 graphs attend over the
  whole context, so outputs agree up to the window length; the export report warns when that is shorter than
  the context.
- Tokenizer: byte-level BPE only (`tokenizer.ggml.model` gpt2): tokens in the byte alphabet, merges, token types
  (special added tokens CONTROL, other added tokens USER_DEFINED, ids the tokenizer lacks UNUSED `[PADn]` up to
  the embedding size), bos/eos/pad/unk ids and the chat templates. The pre-tokenizer name is read from
  tokenizer.json's pre_tokenizer itself (llama.cpp's converter hashes the ids of a test string instead, so it
  never recognises a newly trained tokenizer): lmforge's own tokenizers split like Llama 3 (`llama-bpe`).
- add_bos_token follows the chat template: true when the template writes the BOS text itself (llama.cpp's server
  then strips it from the rendered prompt and adds the id), false when it does not (ChatML), so a chat prompt in
  llama.cpp has the ids it has in lmforge. Without a template, it follows the tokenizer's post-processor.
- End of turn: the end-of-turn token the chat template emits (<|im_end|>, <|eot_id|>, ...) is written as
  `tokenizer.ggml.eot_token_id`, so llama.cpp stops at the end of a reply even when EOS is another token.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

# --type of `lmforge export gguf` that the gguf package quantizes in Python, and llama.cpp's K-quant mixes.
EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
K_QUANT_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
# lmforge model_type -> GGUF general.architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
MAGIC = b"GGUF"

# The split patterns of the byte-level BPE families llama.cpp names (tokenizer.json spells them this way).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


# llama.cpp pre-tokenizer name -> the tokenizer.json pre_tokenizer that splits text the same way. A name's
# normalizer, if any, is the one its HF tokenizers carry (llama.cpp itself applies none).
PRE_TOKENIZERS: dict[str, dict] = {
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_SPLIT), _byte_level(False)]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(QWEN2_SPLIT), _byte_level(False)]},
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     _byte_level(True)]},
    "gpt-2": _byte_level(True),
}
_NORMALIZERS = {"qwen2": {"type": "NFC"}}
# Names llama.cpp loads with the same split as a key above (other spellings in its llama-vocab.cpp).
_PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "dbrx": "llama-bpe", "smaug-bpe": "llama-bpe",
                "deepseek-r1-qwen": "qwen2", "starcoder": "smollm", "refact": "smollm", "default": "gpt-2"}
# llama.cpp takes a whole word from the vocabulary before merging for these (its `ignore_merges`).
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}

# token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_PAD_TOKEN = re.compile(r"\[PAD\d+\]")

# lmforge (HF) tensor names <-> GGUF names
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def gguf_tensor_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (and the global tensors)."""
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    base, _, kind = name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise LmforgeError(f"tensor {name!r} has no GGUF name (lmforge writes Llama/Mistral/Qwen2 decoders only)")


def lmforge_tensor_name(name: str) -> str | None:
    """The inverse of gguf_tensor_name; None for names it does not know."""
    m = _GGUF_LAYER_RE.fullmatch(name)
    if m:
        inv = {v: k for k, v in _LAYER_NAMES.items()}
        if m.group(2) in inv:
            return f"model.layers.{m.group(1)}.{inv[m.group(2)]}.{m.group(3)}"
        return None
    base, _, kind = name.rpartition(".")
    inv_global = {v: k for k, v in _GLOBAL_NAMES.items()}
    return f"{inv_global[base]}.{kind}" if base in inv_global else None


# ---- the q/k row permutation ------------------------------------------------------------------------------
def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k weight or bias [H*D, ...] from rotate-half order (i, i+D/2) to adjacent pairs (2i, 2i+1)."""
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_from_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of permute_for_gguf."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# ---- byte-level spelling (GPT-2's map of the 256 bytes to printable characters) ---------------------------
def _bytes_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


# ---- the pre-tokenizer ------------------------------------------------------------------------------------
def _canonical(spec: Any) -> Any:
    """A pre-tokenizer / normalizer spec reduced to what changes how text is split (for comparison)."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        parts = [_canonical(p) for p in spec.get("pretokenizers", spec.get("normalizers", []))]
        return parts[0] if len(parts) == 1 else ("Sequence", tuple(parts))
    if kind == "ByteLevel":
        return ("ByteLevel", bool(spec.get("add_prefix_space", True)), bool(spec.get("use_regex", True)))
    if kind == "Split":
        pattern = spec.get("pattern", {})
        pattern = pattern.get("Regex", pattern.get("String")) if isinstance(pattern, dict) else pattern
        return ("Split", pattern, str(spec.get("behavior", "")).lower(), bool(spec.get("invert", False)))
    if kind == "Digits":
        return ("Digits", bool(spec.get("individual_digits", False)))
    return (kind, json.dumps(spec, sort_keys=True))


def _describe(spec: Any) -> str:
    c = _canonical(spec)
    if c is None:
        return "none"
    if c[0] == "Sequence":
        return "Sequence[" + ", ".join(_describe_one(p) for p in c[1]) + "]"
    return _describe_one(c)


def _describe_one(c: tuple) -> str:
    if c[0] == "Split":
        return f"Split({c[1][:60]!r}{'...' if len(c[1]) > 60 else ''})"
    if c[0] == "ByteLevel":
        return f"ByteLevel(use_regex={c[2]})"
    return c[0]


def _backend_json(tokenizer: Tokenizer) -> dict:
    return json.loads(tokenizer.backend.to_str())


def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE, read from its tokenizer.json.

    Raises LmforgeError naming what to pass (--pre-tokenizer) when the split is not one lmforge recognises.
    """
    spec = _backend_json(tokenizer).get("pre_tokenizer")
    found = _canonical(spec)
    for name, known in PRE_TOKENIZERS.items():
        if found == _canonical(known):
            return name
    raise LmforgeError(
        f"this tokenizer's pre-tokenizer ({_describe(spec)}) is not one lmforge knows the llama.cpp name of "
        f"({', '.join(PRE_TOKENIZERS)}); without the right name llama.cpp splits text differently and the model "
        "sees other ids. Find the name whose regex matches in llama.cpp's src/llama-vocab.cpp and pass it: "
        "--pre-tokenizer NAME (e.g. --pre-tokenizer llama-bpe)")


# ---- export -----------------------------------------------------------------------------------------------
@dataclass
class ExportReport:
    """What write_gguf wrote: the file, its type, tensor types and anything the user should know."""

    path: Path
    out_type: str
    pre_tokenizer: str
    tensor_types: Counter = field(default_factory=Counter)
    fallbacks: list[str] = field(default_factory=list)  # tensors written as F16 instead of the requested type
    warnings: list[str] = field(default_factory=list)
    eot_id: int | None = None
    stop_ids: list[int] = field(default_factory=list)
    add_bos: bool = False
    bytes: int = 0


def _qtype(name: str):
    Q = _import_gguf_package().GGMLQuantizationType
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
            "q5_0": Q.Q5_0, "q5_1": Q.Q5_1}[name]


def _file_type(name: str):
    F = _import_gguf_package().LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1, "q5_0": F.MOSTLY_Q5_0, "q5_1": F.MOSTLY_Q5_1}[name]


def _import_gguf_package():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LmforgeError("reading and writing GGUF files needs the `gguf` package (llama.cpp's Python "
                           "library): pip install gguf") from None
    return gguf


def rope_freqs(cfg: ModelConfig) -> np.ndarray | None:
    """llama.cpp's rope_freqs tensor for Llama 3.1 scaling: the divisor of each rotary frequency (None if unscaled)."""
    from lmforge.model.transformer import rope_inv_freq

    rs = cfg.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) != "llama3":
        return None
    plain = rope_inv_freq(cfg.replace(rope_scaling=None)).double()
    scaled = rope_inv_freq(cfg).double()
    return (plain / scaled).float().numpy()


def _tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int, pre: str | None, stop_ids: list[int],
                        report: ExportReport) -> dict[str, Any]:
    """Everything llama.cpp reads about the tokenizer, as {key suffix: value}; checks what it cannot express."""
    data = _backend_json(tokenizer)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise LmforgeError(f"the tokenizer is a {model.get('type')} model; lmforge exports byte-level BPE "
                           "tokenizers (GPT-2, Llama 3, Qwen2, SmolLM and lmforge's own) to GGUF")
    decoder = json.dumps(data.get("decoder"))
    if model.get("byte_fallback") or '"ByteLevel"' not in decoder:
        raise LmforgeError("the tokenizer is a SentencePiece-style BPE (byte fallback, '▁' for spaces, as in "
                           "Llama 2 and Mistral 7B); lmforge writes byte-level BPE tokenizers only. Convert this "
                           "model with llama.cpp's convert_hf_to_gguf.py, which reads its tokenizer.model")
    norm = _canonical(data.get("normalizer"))
    name = pre or pre_tokenizer_name(tokenizer)
    if norm is not None and norm != _canonical(_NORMALIZERS.get(name)):
        report.warnings.append(f"the tokenizer normalizes text ({_describe(data.get('normalizer'))}); llama.cpp "
                               "does not, so text that normalization changes gets other ids there")
    added = tokenizer.backend.get_added_tokens_decoder()
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    n_tok = tokenizer.vocab_size
    if n_tok > vocab_size:
        raise LmforgeError(f"the tokenizer has {n_tok} ids but the model's embedding only {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = NORMAL
    for i, tok in added.items():
        tokens[i] = tok.content  # llama.cpp matches CONTROL and USER_DEFINED tokens as raw text
        types[i] = CONTROL if tok.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if any(" " in a for m in model.get("merges", []) if not isinstance(m, str) for a in m):
        raise LmforgeError("a merge of this tokenizer contains a space; byte-level BPE merges never do, so "
                           "the tokenizer is not one llama.cpp can load")
    meta: dict[str, Any] = {"model": "gpt2", "pre": name, "tokens": tokens, "token_type": types, "merges": merges}
    for key, tid in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                     ("padding_token_id", tokenizer.pad_id), ("unknown_token_id", tokenizer.unk_id)):
        if tid is not None:
            meta[key] = tid
    report.pre_tokenizer = name
    if name in _IGNORE_MERGES and not model.get("ignore_merges"):
        # llama.cpp takes a word that is a vocabulary token whole; this tokenizer merges it, which agrees unless
        # the merges do not rebuild that token from its characters
        bpe = tokenizer.backend.model
        odd = [t for t, i in vocab.items() if i not in added and len(t) > 1 and len(bpe.tokenize(t)) != 1]
        if odd:
            report.warnings.append(f"{len(odd)} vocabulary token(s) are not built by the tokenizer's own merges "
                                   f"(e.g. {odd[0]!r}); llama.cpp's {name!r} takes such a word whole, so it gets "
                                   "other ids there")
    elif name not in _IGNORE_MERGES and model.get("ignore_merges"):
        report.warnings.append(f"the tokenizer takes words found in its vocabulary whole and llama.cpp's {name!r} "
                               "merges them; a rare word can get other ids there")

    # add_bos as the chat template expects it (see the module docstring)
    template = tokenizer.chat_template
    add_bos = False
    if template is not None and tokenizer.bos_token:
        # does the template write the bos_token variable? (not the same text: SmolLM2's BOS is <|im_start|>)
        from lmforge.tokenizer import chat

        mark = "\x00bos\x00"
        try:
            text = chat.render(template, [{"role": "user", "content": "hi"}], True, mark, tokenizer.eos_token)
            add_bos = text.startswith(mark)
        except LmforgeError:
            add_bos = False
    ids = tokenizer.encode("hi", add_special_tokens=True)
    if template is None or not tokenizer.bos_token:
        add_bos = tokenizer.bos_id is not None and ids[:1] == [tokenizer.bos_id]
    meta["add_bos_token"] = add_bos
    meta["add_eos_token"] = tokenizer.eos_id is not None and ids[-1:] == [tokenizer.eos_id]
    report.add_bos = add_bos

    # end of turn: the end-of-turn token the template emits (<|im_end|>, <|eot_id|>; <|eom_id|> is "end of
    # message", a key of its own), else EOS when the template writes it at a turn's end (SmolLM2, Llama 3.1
    # Instruct), else the first special stop id that is not EOS
    eom = tokenizer.token_to_id("<|eom_id|>")
    turn_ends = [i for i in tokenizer.stop_ids if i not in (tokenizer.eos_id, eom)]
    if turn_ends:
        eot = turn_ends[0]
    elif tokenizer.eos_token and template and tokenizer.eos_token in "".join(tokenizer.chat_templates.values()):
        eot = tokenizer.eos_id
    else:
        eot = next((i for i in stop_ids if i not in (tokenizer.eos_id, eom) and types[i] == CONTROL), None)
    if eot is not None:
        meta["eot_token_id"] = eot
        if types[eot] != CONTROL:
            raise LmforgeError(f"the end-of-turn token {tokens[eot]!r} is not a special token of the tokenizer; "
                               "llama.cpp stops only on special (control) tokens")
    if eom is not None and eom in stop_ids:
        meta["eom_token_id"] = eom
    report.eot_id = eot
    report.stop_ids = list(stop_ids)
    known_eog = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                 "<|end_of_text|>", "<EOT>"}
    for i in stop_ids:
        if i not in (tokenizer.eos_id, eot, eom) and tokens[i] not in known_eog:
            report.warnings.append(f"stop token {tokens[i]!r} (id {i}) is neither EOS nor the end-of-turn token; "
                                   "llama.cpp will not stop on it by itself (an Ollama Modelfile can list it)")
    if tokenizer.chat_templates:
        meta["chat_templates"] = dict(tokenizer.chat_templates)
    return meta


def write_gguf(model: Transformer, tokenizer: Tokenizer, out: str | Path, out_type: str = "f16", *,
               pre_tokenizer: str | None = None, stop_ids: list[int] | None = None,
               name: str | None = None) -> ExportReport:
    """Write `model` and `tokenizer` as one GGUF file of `out_type` (one of EXPORT_TYPES), atomically.

    stop_ids: every id generation stops on (default: the tokenizer's EOS and end-of-turn tokens).
    pre_tokenizer: llama.cpp's pre-tokenizer name, when lmforge cannot tell it from tokenizer.json.
    """
    import numpy as np

    gguf = _import_gguf_package()
    Q = gguf.GGMLQuantizationType
    if out_type not in EXPORT_TYPES:
        raise LmforgeError(f"unknown GGUF type {out_type!r}; choose one of {', '.join(EXPORT_TYPES)} "
                           f"(K-quants: {', '.join(K_QUANT_TYPES)})")
    cfg = model.cfg
    if cfg.model_type not in ARCHITECTURES:
        raise LmforgeError(f"model_type {cfg.model_type!r} has no GGUF architecture lmforge writes")
    arch = ARCHITECTURES[cfg.model_type]
    out = Path(out)
    report = ExportReport(path=out, out_type=out_type, pre_tokenizer=pre_tokenizer or "")
    if arch == "qwen2" and cfg.head_size * cfg.n_heads != cfg.hidden_size:
        raise LmforgeError("llama.cpp's qwen2 graph needs head_dim * n_heads == hidden_size")
    if arch == "llama" and cfg.qkv_bias:
        report.warnings.append("q/k/v biases on a llama model: llama.cpp loads them (optional tensors)")
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in (None, "default", "llama3", "linear"):
        raise LmforgeError(f"rope scaling {kind!r} is not exported to GGUF yet (lmforge writes llama3 and linear; "
                           "llama.cpp's YaRN parameters have not been checked against lmforge's)")
    if kind == "llama3" and arch != "llama":
        raise LmforgeError("llama.cpp applies Llama 3.1 rope scaling (rope_freqs) to llama models only")

    stops = list(stop_ids) if stop_ids is not None else list(tokenizer.stop_ids)
    tok_meta = _tokenizer_metadata(tokenizer, cfg.vocab_size, pre_tokenizer, stops, report)
    if cfg.sliding_window and cfg.sliding_window < cfg.max_seq_len:
        report.warnings.append(f"sliding window {cfg.sliding_window}: llama.cpp's {arch} graph attends over the "
                               f"whole context, so its outputs match lmforge's only up to {cfg.sliding_window} "
                               "tokens")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_type("model")
        writer.add_name(name or out.stem)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_size)
        if cfg.head_size * cfg.n_heads != cfg.hidden_size:
            writer.add_key_length(cfg.head_size)
            writer.add_value_length(cfg.head_size)
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rs["factor"]))
        if cfg.sliding_window:
            writer.add_sliding_window(cfg.sliding_window)
        writer.add_file_type(_file_type(out_type))
        if out_type not in ("f32", "f16", "bf16"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        t = tok_meta
        writer.add_tokenizer_model(t["model"])
        writer.add_tokenizer_pre(t["pre"])
        writer.add_token_list(t["tokens"])
        writer.add_token_types(t["token_type"])
        writer.add_token_merges(t["merges"])
        for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                         ("padding_token_id", writer.add_pad_token_id), ("unknown_token_id", writer.add_unk_token_id),
                         ("eot_token_id", writer.add_eot_token_id), ("eom_token_id", writer.add_eom_token_id)):
            if key in t:
                add(int(t[key]))
        writer.add_add_bos_token(bool(t["add_bos_token"]))
        writer.add_add_eos_token(bool(t["add_eos_token"]))
        templates = t.get("chat_templates") or {}
        if list(templates) == ["default"]:
            writer.add_chat_template(templates["default"])
        elif templates:
            writer.add_chat_template([{"name": k, "template": v} for k, v in templates.items()])

        want = _qtype(out_type)
        extra = rope_freqs(cfg)
        tensors: list[tuple[str, Any]] = [("rope_freqs.weight", extra)] if extra is not None else []
        state = model.state_dict()
        for key, value in state.items():
            if key.endswith("inv_freq") or (cfg.tie_embeddings and key == "lm_head.weight"):
                continue
            tensors.append((key, value))
        for key, value in tensors:
            gname = key if key == "rope_freqs.weight" else gguf_tensor_name(key)
            data = value if isinstance(value, np.ndarray) else value.detach().to("cpu").float().numpy()
            if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
                data = permute_for_gguf(data, cfg.n_heads if ".attn_q." in gname else cfg.n_kv_heads)
            data = np.ascontiguousarray(data, dtype=np.float32)
            qtype = Q.F32 if data.ndim <= 1 or gname.endswith("_norm.weight") else want
            try:
                raw = gguf.quants.quantize(data, qtype)
            except (gguf.QuantError, ValueError):
                qtype = Q.F16
                raw = gguf.quants.quantize(data, qtype)
                report.fallbacks.append(f"{gname} {list(data.shape)}")
            writer.add_tensor(gname, raw, raw_dtype=qtype)
            report.tensor_types[qtype.name] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        try:
            writer.close()
        except Exception:  # the writer may already be closed or never opened its file
            pass
        tmp.unlink(missing_ok=True)
        raise
    if report.fallbacks:
        report.warnings.append(f"{len(report.fallbacks)} matri{'x' if len(report.fallbacks) == 1 else 'ces'} whose "
                               f"rows are not a multiple of 32 were written as F16, not {out_type.upper()}: "
                               + ", ".join(report.fallbacks[:4]) + (" ..." if len(report.fallbacks) > 4 else ""))
    report.bytes = out.stat().st_size
    return report


# ---- import -----------------------------------------------------------------------------------------------
@dataclass
class GGUFModel:
    """What read_gguf found: the config, float32 weights in lmforge names, the tokenizer and the stop ids."""

    path: Path
    architecture: str
    cfg: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None
    stop_ids: list[int]
    tensor_types: Counter
    file_type: str | None
    name: str | None

    def to_model(self, dtype: torch.dtype | None = None) -> Transformer:
        """A Transformer holding these weights (eval mode)."""
        import torch

        from lmforge.model.transformer import Transformer, rope_inv_freq

        with torch.device("meta"):
            model = Transformer(self.cfg)
        model = model.to_empty(device="cpu")
        state = {k: (v if dtype is None else v.to(dtype)) for k, v in self.tensors.items()}
        model.load_state_dict(state, strict=False, assign=True)
        if self.cfg.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(self.cfg)
        return model.eval()


def is_gguf(path: str | Path) -> bool:
    """True if `path` is a file that starts with the GGUF magic bytes."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


@dataclass
class _Tensor:
    name: str
    shape: list[int]  # GGUF order: innermost dimension first
    tensor_type: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int


class _GGUFFile:
    """A GGUF file's metadata (as Python values) and tensor directory, parsed in one pass over its header.

    The gguf package's GGUFReader builds a numpy view per array element, which takes seconds for a tokenizer of
    50k tokens and 50k merges; this reads the same layout (llama.cpp's gguf.h: magic, version, counts, key/value
    pairs, tensor infos, aligned data) with struct and numpy.frombuffer, and leaves the tensor bytes on disk
    (memory-mapped) until a tensor is asked for.
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
              12: "<f8"}

    def __init__(self, path: Path):
        import mmap
        import struct

        self.path = path
        with open(path, "rb") as fh:
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = len(self._mm)
        self._struct = struct
        self._pos = 4
        version = self._u("<I")
        if version not in (2, 3):
            raise LmforgeError(f"{path}: GGUF version {version} is not supported (2 and 3 are); convert it again "
                               "with a current llama.cpp")
        n_tensors, n_kv = self._u("<Q"), self._u("<Q")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise LmforgeError(f"{path}: the header claims {n_tensors} tensors and {n_kv} keys; the file is damaged")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._str()
            self.fields[key] = self._value(self._u("<I"))
        gg = _import_gguf_package()
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            dims = [self._u("<Q") for _ in range(self._u("<I"))]
            qtype = gg.GGMLQuantizationType(self._u("<I"))
            infos.append((name, dims, qtype, self._u("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors = []
        for name, dims, qtype, offset in infos:
            block, size = gg.GGML_QUANT_SIZES[qtype]
            self.tensors.append(_Tensor(name, dims, qtype, start + offset, math.prod(dims) * size // block))

    def _u(self, fmt: str) -> Any:
        v = self._struct.unpack_from(fmt, self._mm, self._pos)[0]
        self._pos += self._struct.calcsize(fmt)
        return v

    def _str(self) -> str:
        n = self._u("<Q")
        if self._pos + n > self.size:
            raise ValueError("string runs past the end of the file")
        v = self._mm[self._pos:self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return v

    def _value(self, kind: int) -> Any:
        if kind in self._SCALARS:
            return self._u(self._SCALARS[kind])
        if kind == 8:
            return self._str()
        if kind == 9:
            item, n = self._u("<I"), self._u("<Q")
            if item in self._NUMPY:
                import numpy as np

                dt = np.dtype(self._NUMPY[item])
                arr = np.frombuffer(self._mm, dtype=dt, count=n, offset=self._pos)
                self._pos += n * dt.itemsize
                return arr.tolist()
            return [self._value(item) for _ in range(n)]
        raise ValueError(f"unknown metadata value type {kind}")

    def data(self, t: _Tensor) -> np.ndarray:
        """The tensor's bytes as numpy reads them for gguf.quants.dequantize (F32/F16 typed, others uint8 rows)."""
        import numpy as np

        gg = _import_gguf_package()
        Q = gg.GGMLQuantizationType
        dims = tuple(reversed(t.shape))
        typed = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
                 Q.I32: np.int32, Q.I64: np.int64}
        if t.tensor_type in typed:
            dt = np.dtype(typed[t.tensor_type])
            return np.frombuffer(self._mm, dtype=dt, count=t.n_bytes // dt.itemsize, offset=t.offset).reshape(dims)
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=t.n_bytes, offset=t.offset)
        return raw.reshape(gg.quant_shape_to_byte_shape(dims, t.tensor_type))


def _open_reader(path: Path) -> _GGUFFile:
    _import_gguf_package()
    if not path.is_file():
        raise LmforgeError(f"GGUF file {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != MAGIC:
        raise LmforgeError(f"{path} is not a GGUF file (it starts with {head!r}, not b'GGUF'); give a .gguf "
                           "model file, e.g. one from llama.cpp or `lmforge export gguf`")
    try:
        reader = _GGUFFile(path)
    except LmforgeError:
        raise
    except Exception as e:  # struct.error, ValueError, UnicodeError... on a cut or damaged header
        raise LmforgeError(f"{path} cannot be read as GGUF ({type(e).__name__}: {e}); the file is truncated or "
                           "damaged: download or export it again") from None
    for t in reader.tensors:
        if t.offset + t.n_bytes > reader.size:
            raise LmforgeError(f"{path} is truncated: tensor {t.name} needs bytes up to {t.offset + t.n_bytes:,} "
                               f"but the file has {reader.size:,}; download or export it again")
    return reader


def _field(reader: _GGUFFile, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file except the token arrays (for reports and tests)."""
    reader = _open_reader(Path(path))
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    return {k: v for k, v in reader.fields.items() if k not in skip}


def read_tensor_types(path: str | Path) -> Counter:
    """How many tensors of each type (F32, Q4_K, ...) a GGUF file holds."""
    return Counter(t.tensor_type.name for t in _open_reader(Path(path)).tensors)


def _llama3_scaling(freqs: np.ndarray, cfg: ModelConfig, where: str) -> dict:
    """Recover a llama3 rope_scaling dict whose divisors equal llama.cpp's rope_freqs tensor."""
    import numpy as np
    import torch

    from lmforge.model.transformer import rope_inv_freq

    freqs = np.asarray(freqs, dtype=np.float64)
    factor = float(freqs.max())
    plain = rope_inv_freq(cfg.replace(rope_scaling=None)).double().numpy()
    wavelen = 2 * math.pi / plain
    candidates = []
    smooth = (freqs > 1 + 1e-6) & (freqs < factor - 1e-6)
    for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
        if smooth.any():
            # 1/r = (1 - s)/factor + s, s = (old_ctx/wavelen - low)/(high - low): solve each smooth dim for old_ctx
            s = (1 / freqs[smooth] - 1 / factor) / (1 - 1 / factor)
            ctx = wavelen[smooth] * (low + s * (high - low))
            candidates.append((low, high, float(np.median(ctx))))
        else:
            # no smooth band: any old_ctx that classifies every dim the same way reproduces the tensor
            lo = max([wavelen[i] * high for i in range(len(freqs)) if freqs[i] <= 1 + 1e-6], default=1.0)
            hi = min([wavelen[i] * low for i in range(len(freqs)) if freqs[i] >= factor - 1e-6], default=lo * 2)
            for ctx in (8192.0, 4096.0, 2048.0, 16384.0, 32768.0, (lo + hi) / 2):
                candidates.append((low, high, ctx))
    for low, high, ctx in candidates:
        ctx = float(round(ctx)) if abs(ctx - round(ctx)) < 1e-3 * ctx else ctx
        rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
              "original_max_position_embeddings": int(ctx) if float(ctx).is_integer() else ctx}
        mine = (torch.from_numpy(plain) / rope_inv_freq(cfg.replace(rope_scaling=rs)).double()).numpy()
        if np.allclose(mine, freqs, rtol=1e-4, atol=1e-5):
            return rs
    raise LmforgeError(f"{where}: its rope_freqs tensor is not a Llama 3.1 scaling lmforge can reproduce")


def read_gguf(path: str | Path) -> GGUFModel:
    """Read a Llama/Mistral/Qwen2 GGUF: config, dequantized float32 weights (lmforge names), tokenizer, stop ids."""
    gguf = _import_gguf_package()
    import numpy as np
    import torch

    p = Path(path)
    reader = _open_reader(p)
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise LmforgeError(f"{p}: GGUF architecture {arch!r} is not supported; lmforge imports llama (Llama, "
                           "Mistral, SmolLM, TinyLlama) and qwen2 models")
    name = _field(reader, "general.name")

    def key(suffix: str, default: Any = None, required: bool = False) -> Any:
        value = _field(reader, f"{arch}.{suffix}", default)
        if required and value is None:
            raise LmforgeError(f"{p}: metadata key {arch}.{suffix} is missing; the file is not a complete model")
        return value

    names = {t.name: t for t in reader.tensors}
    unknown = [n for n in names if n != "rope_freqs.weight" and lmforge_tensor_name(n) is None]
    if unknown:
        hint = " (a mixture-of-experts model)" if any("exps" in n for n in unknown) else ""
        raise LmforgeError(f"{p}: tensors lmforge does not know{hint}: {', '.join(unknown[:4])}; lmforge imports "
                           "dense Llama/Mistral/Qwen2 decoders")
    if "token_embd.weight" not in names:
        raise LmforgeError(f"{p} has no token_embd.weight; it is not a language model file")
    hidden = int(key("embedding_length", required=True))
    n_heads = int(key("attention.head_count", required=True))
    n_kv = key("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        raise LmforgeError(f"{p}: per-layer key/value head counts are not supported")
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // n_heads
    if head_dim != (key("rope.dimension_count") or head_dim):
        raise LmforgeError(f"{p}: partial rotary embeddings (rope dimension {key('rope.dimension_count')} of "
                           f"head size {head_dim}) are not supported")
    vocab_rows = int(reversed_shape(names["token_embd.weight"])[0])
    sliding = key("attention.sliding_window")
    qkv_bias = "blk.0.attn_q.bias" in names
    model_type = arch
    if arch == "llama":
        if qkv_bias:
            raise LmforgeError(f"{p}: q/k/v biases on a llama-architecture model are not supported")
        model_type = "mistral" if sliding or "mistral" in str(name or "").lower() else "llama"
    scaling = None
    kind = key("rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise LmforgeError(f"{p}: rope scaling {kind!r} is not imported (lmforge reads llama3 and linear from "
                               "GGUF)")
        scaling = {"rope_type": "linear", "factor": float(str(np.float32(key("rope.scaling.factor", 1.0))))}
    def f32(v: Any) -> float:
        return float(str(np.float32(v)))  # GGUF stores float32: 1e-05 comes back as 9.9999997e-06

    cfg = ModelConfig(
        model_type=model_type, vocab_size=vocab_rows, hidden_size=hidden, n_layers=int(key("block_count", required=True)),
        n_heads=n_heads, n_kv_heads=int(n_kv), intermediate_size=int(key("feed_forward_length", required=True)),
        max_seq_len=int(key("context_length", 2048)), head_dim=None if head_dim * n_heads == hidden else int(head_dim),
        rope_theta=f32(key("rope.freq_base", 10000.0)), rope_scaling=scaling,
        norm_eps=f32(key("attention.layer_norm_rms_epsilon", 1e-5)), qkv_bias=qkv_bias,
        tie_embeddings="output.weight" not in names, sliding_window=int(sliding) if sliding else None)
    cfg.validate()
    if "rope_freqs.weight" in names:
        freqs = gguf.quants.dequantize(reader.data(names["rope_freqs.weight"]), names["rope_freqs.weight"].tensor_type)
        if not np.allclose(freqs, 1.0):
            cfg.rope_scaling = _llama3_scaling(freqs.reshape(-1), cfg, str(p))

    tensors: dict[str, torch.Tensor] = {}
    types: Counter = Counter()
    for gname, t in names.items():
        if gname == "rope_freqs.weight":
            continue
        types[t.tensor_type.name] += 1
        try:
            data = gguf.quants.dequantize(reader.data(t), t.tensor_type)
        except NotImplementedError:
            raise LmforgeError(f"{p}: tensor type {t.tensor_type.name} of {gname} cannot be dequantized by the "
                               "installed gguf package (pip install -U gguf)") from None
        data = np.asarray(data, dtype=np.float32).reshape(reversed_shape(t))
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            data = unpermute_from_gguf(data, cfg.n_heads if ".attn_q." in gname else cfg.n_kv_heads)
        tensors[lmforge_tensor_name(gname)] = torch.from_numpy(np.array(data, dtype=np.float32, copy=True))
    _check_shapes(tensors, cfg, p)

    tokenizer = read_tokenizer(reader, cfg, p)
    stops: list[int] = []
    for k in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = _field(reader, f"tokenizer.ggml.{k}")
        if v is not None and int(v) not in stops:
            stops.append(int(v))
    if tokenizer is not None:
        stops += [i for i in tokenizer.stop_ids if i not in stops]
    ftype = _field(reader, "general.file_type")
    try:
        ftype_name = gguf.LlamaFileType(int(ftype)).name if ftype is not None else None
    except ValueError:
        ftype_name = str(ftype)
    return GGUFModel(path=p, architecture=arch, cfg=cfg, tensors=tensors, tokenizer=tokenizer, stop_ids=stops,
                     tensor_types=types, file_type=ftype_name, name=name)


def reversed_shape(t) -> tuple[int, ...]:
    """A GGUF tensor's shape in torch order (GGUF lists dimensions innermost first)."""
    return tuple(int(d) for d in reversed(list(t.shape)))


def _check_shapes(tensors: dict[str, torch.Tensor], cfg: ModelConfig, where: Path) -> None:
    import torch

    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        expected = Transformer(cfg).state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise LmforgeError(f"{where} lacks {len(missing)} tensor(s) its metadata implies, e.g. {missing[:3]}")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise LmforgeError(f"{where}: tensor {gguf_tensor_name(k)} has shape {tuple(tensors[k].shape)} but the "
                               f"metadata implies {tuple(v.shape)}")


def read_tokenizer(reader, cfg: ModelConfig, where: Path) -> Tokenizer | None:
    """The Tokenizer a GGUF's tokenizer.* metadata describes (None when it has none)."""
    from tokenizers import processors

    from lmforge.tokenizer import Tokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    if kind is None:
        return None
    tokens = list(_field(reader, "tokenizer.ggml.tokens") or [])
    types = list(_field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if kind == "llama":
        backend = _sentencepiece_backend(reader, tokens, types)
        add_bos_default = True
    elif kind == "gpt2":
        backend = _byte_level_backend(reader, tokens, types, where)
        add_bos_default = False
    else:
        raise LmforgeError(f"{where}: tokenizer model {kind!r} is not supported (gpt2 byte-level BPE and llama "
                           "SentencePiece are)")

    def token(k: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{k}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    add_bos = add_bos_default if add_bos is None else bool(add_bos)
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token") or False)
    if (add_bos and bos) or (add_eos and eos):
        single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
        pair = single + ([f"{bos}:1"] if add_bos and bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos and eos else [])
        specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(
            ([bos] if add_bos and bos else []) + ([eos] if add_eos and eos else []))]
        backend.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                               special_tokens=specials)
    elif kind == "gpt2":
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    templates: dict[str, str] = {}
    default = _field(reader, "tokenizer.chat_template")
    if default:
        templates["default"] = default
    for k in reader.fields:
        if k.startswith("tokenizer.chat_template."):
            templates[k.removeprefix("tokenizer.chat_template.")] = _field(reader, k)
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=token("padding_token_id"),
                     unk_token=token("unknown_token_id"), chat_template=templates or None,
                     model_max_length=cfg.max_seq_len)


def _added_tokens(backend, tokens: list[str], types: list[int]) -> None:
    """CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens, matched whole in text."""
    import tokenizers

    special = [tokenizers.AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty == CONTROL]
    user = [tokenizers.AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
            if ty == USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _vocab(tokens: list[str], types: list[int], where: Path) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == UNUSED and _PAD_TOKEN.fullmatch(t):
            continue  # llama.cpp's filler up to the embedding size: not a token of the tokenizer
        if t in vocab:
            raise LmforgeError(f"{where}: token {t!r} appears twice (ids {vocab[t]} and {i}); the vocabulary is damaged")
        vocab[t] = i
    return vocab


def _byte_level_backend(reader, tokens: list[str], types: list[int], where: Path):
    import tokenizers
    from tokenizers import models

    pre = str(_field(reader, "tokenizer.ggml.pre") or "default")
    canonical = _PRE_ALIASES.get(pre, pre)
    if canonical not in PRE_TOKENIZERS:
        raise LmforgeError(f"{where}: pre-tokenizer {pre!r} is not one lmforge can rebuild ({', '.join(PRE_TOKENIZERS)} "
                           "and their aliases); its text would be split differently from llama.cpp")
    merges = [tuple(m.split(" ", 1)) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
    vocab = _vocab(tokens, types, where)
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES)
    backend = tokenizers.Tokenizer(bpe)
    spec = {"pre_tokenizer": PRE_TOKENIZERS[canonical], "normalizer": _NORMALIZERS.get(canonical)}
    data = json.loads(backend.to_str())
    data.update(spec)
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    _added_tokens(backend, tokens, types)
    return backend


def _sentencepiece_backend(reader, tokens: list[str], types: list[int]):
    """SentencePiece BPE (Llama 2, Mistral 7B, TinyLlama): merges recovered from the token scores."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    scores = list(_field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    # A piece's merge is each split of it into two pieces of the vocabulary; higher-scored pieces merge first.
    merges: list[tuple[float, int, int, str, str]] = []
    for t, i in vocab.items():
        if types[i] not in (NORMAL, USER_DEFINED) or len(t) < 2:
            continue
        for cut in range(1, len(t)):
            a, b = t[:cut], t[cut:]
            if a in vocab and b in vocab:
                merges.append((-scores[i], vocab[a], vocab[b], a, b))
    merges.sort()
    unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    bpe = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk, fuse_unk=True,
                     byte_fallback=True)
    backend = tokenizers.Tokenizer(bpe)
    add_prefix = _field(reader, "tokenizer.ggml.add_space_prefix")
    add_prefix = True if add_prefix is None else bool(add_prefix)
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_prefix else "never",
                                                     split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    _added_tokens(backend, tokens, types)
    return backend
