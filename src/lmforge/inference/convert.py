"""GGUF in and out of lmforge: the verbs `lmforge export gguf`, `lmforge export ollama` and `lmforge import gguf`.

Owns the recipes "model directory (+ LoRA adapter) -> .gguf" (K-quants through llama.cpp's own quantizer when
one is installed) and "-> .gguf + Ollama Modelfile", and the import verb. Leaves the GGUF format to
lmforge/gguf.py, the HF format to checkpoint.py, ".gguf -> HF model directory" and its cache to
inference/gguf_import.py, adapter loading and merging to inference/load.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmforge import checkpoint, gguf
from lmforge.config import opt
from lmforge.errors import LmforgeError
from lmforge.inference.generate import need_tokenizer
from lmforge.inference.gguf_import import DTYPES, import_gguf
from lmforge.inference.load import load, packaged_gguf

ALL_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
             "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
# what `ollama create --quantize` accepts (from an F16/BF16 GGUF)
_OLLAMA_QUANTS = {"q4_k_m": "q4_K_M", "q4_k_s": "q4_K_S", "q8_0": "q8_0"}


# ---- import -------------------------------------------------------------------------------------------
@dataclass
class ImportConfig:
    path: str = opt("", "the .gguf file to import (or a packaged model name, e.g. smollm2-135m-instruct)",
                    positional=True)
    out: str = opt("", "HF model directory to write (config.json, model.safetensors, tokenizer files)")
    dtype: str = opt("float32", "weight dtype of the directory (float32 keeps the dequantized values exactly)",
                     choices=list(DTYPES))


def run_import(cfg: ImportConfig) -> int:
    if not cfg.path:
        raise LmforgeError("give the GGUF file: lmforge import gguf FILE.gguf --out DIR")
    if not cfg.out:
        raise LmforgeError("give an output directory: --out DIR")
    src = packaged_gguf(cfg.path) or Path(cfg.path)
    out = import_gguf(src, cfg.out, cfg.dtype)
    meta = gguf.read_metadata(src)
    print(f"imported {src} ({meta.get('general.architecture')}, file type {meta.get('general.file_type')}) -> "
          f"{out}", file=sys.stderr)
    print(out)
    return 0


# ---- export -------------------------------------------------------------------------------------------
def _quantizer() -> tuple[str, object] | None:
    """An installed K-quant quantizer: ('llama-quantize', path) or ('llama_cpp', module), else None."""
    exe = os.environ.get("LMFORGE_LLAMA_QUANTIZE") or shutil.which("llama-quantize")
    if exe:
        return "llama-quantize", exe
    try:
        import llama_cpp
    except ImportError:
        return None
    return "llama_cpp", llama_cpp


def k_quantize(src: Path, dst: Path, kind: str) -> str:
    """Quantize the F16/BF16/F32 GGUF `src` to K-quant `kind` (e.g. q4_k_m) at dst; returns the tool used."""
    found = _quantizer()
    if found is None:
        ollama = " (ollama is installed: `lmforge export ollama --type " + kind + "` lets `ollama create` quantize)" \
            if shutil.which("ollama") else ""
        raise LmforgeError(f"--type {kind} is a llama.cpp K-quant, which needs llama.cpp's quantizer: install "
                           "llama.cpp (its `llama-quantize` binary on PATH, or LMFORGE_LLAMA_QUANTIZE=/path/to/it) "
                           f"or `pip install llama-cpp-python`{ollama}; or export one of f32 f16 bf16 q8_0 q4_0 "
                           "q4_1 q5_0 q5_1, which lmforge quantizes itself")
    tool, handle = found
    if tool == "llama-quantize":
        r = subprocess.run([str(handle), str(src), str(dst), kind.upper()], capture_output=True, text=True)
        if r.returncode != 0 or not dst.is_file():
            raise LmforgeError(f"llama-quantize failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
        return f"llama-quantize ({handle})"
    import ctypes

    ftype = getattr(handle, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}", None)
    if ftype is None:
        raise LmforgeError(f"the installed llama_cpp does not know {kind}")
    params = handle.llama_model_quantize_default_params()
    params.ftype = ftype
    with _captured_stderr() as log:  # llama.cpp logs every tensor from C; keep it for errors only
        rc = handle.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise LmforgeError(f"llama.cpp's quantizer (llama_cpp.llama_model_quantize) failed with code {rc}: "
                           f"{log.text().strip()[-500:]}")
    fallback = [line.strip() for line in log.text().splitlines() if "required fallback quantization" in line]
    note = f"; {fallback[0].split('WARNING: ')[-1]} (rows not a multiple of 256)" if fallback else ""
    return f"llama.cpp's quantizer (llama_cpp {getattr(handle, '__version__', '')}){note}"


class _captured_stderr:
    """Redirect file descriptor 2 (C code's stderr) to a temporary file for the duration of a block."""

    def __enter__(self):
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        return False

    def text(self) -> str:
        self._file.seek(0)
        return self._file.read().decode("utf-8", errors="replace")


def load_for_export(model_path: str | Path, adapter: str | Path | None = None):
    """The model (fp32, adapter merged), its tokenizer and stop ids, as inference.load gives them."""
    lm = load(model_path, dtype="float32", adapter=adapter)
    if adapter and (Path(adapter) / "tokenizer.json").is_file():  # finetuning may have set a chat template
        lm.tokenizer = checkpoint.load_tokenizer(adapter)
        lm.eos_ids += [i for i in lm.tokenizer.stop_ids if i not in lm.eos_ids]
    need_tokenizer(lm.tokenizer, "GGUF export")
    return lm


def write_export(lm, out: str | Path, out_type: str = "f16", *, pre_tokenizer: str | None = None,
                 name: str | None = None):
    """Write a loaded model as a GGUF of out_type (Python quantizers, or llama.cpp's for K-quants)."""
    out_type = out_type.lower()
    if out_type not in ALL_TYPES:
        raise LmforgeError(f"unknown --type {out_type!r}; choose one of {', '.join(ALL_TYPES)}")
    out = Path(out)
    if out_type in gguf.EXPORT_TYPES:
        return gguf.write_gguf(lm.model, lm.tokenizer, out, out_type, pre_tokenizer=pre_tokenizer,
                               stop_ids=lm.eos_ids, name=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        src = Path(tmp) / "source-f16.gguf"
        report = gguf.write_gguf(lm.model, lm.tokenizer, src, "f16", pre_tokenizer=pre_tokenizer,
                                 stop_ids=lm.eos_ids, name=name or out.stem)
        part = Path(tmp) / out.name
        tool = k_quantize(src, part, out_type)
        os.replace(part, out)
    report.path, report.out_type, report.bytes = out, out_type, out.stat().st_size
    report.tensor_types = gguf.read_tensor_types(out)
    report.warnings.append(f"quantized to {out_type.upper()} by {tool}")
    report.fallbacks = []  # llama.cpp chose the fallbacks of the K-quant mix; the note above counts them
    return report


def export_gguf(model_path: str | Path, out: str | Path, out_type: str = "f16", *,
                adapter: str | Path | None = None, pre_tokenizer: str | None = None, name: str | None = None):
    """Load model_path (merging `adapter`) and write a GGUF of out_type at out. Returns gguf.ExportReport."""
    out_type = out_type.lower()
    if out_type not in ALL_TYPES:
        raise LmforgeError(f"unknown --type {out_type!r}; choose one of {', '.join(ALL_TYPES)}")
    if out_type not in gguf.EXPORT_TYPES and _quantizer() is None:
        k_quantize(Path("-"), Path("-"), out_type)  # raises the message saying what to install
    lm = load_for_export(model_path, adapter)
    return write_export(lm, out, out_type, pre_tokenizer=pre_tokenizer, name=name)


def _print_report(report, source: str) -> None:
    types = ", ".join(f"{k} x{v}" for k, v in sorted(report.tensor_types.items()))
    print(f"wrote {report.path} ({report.bytes / 1e6:.1f} MB, {report.out_type}) from {source}: tensors {types}; "
          f"pre-tokenizer {report.pre_tokenizer}, add_bos {str(report.add_bos).lower()}, end-of-turn id "
          f"{report.eot_id}", file=sys.stderr)
    for w in report.warnings:
        print(f"note: {w}", file=sys.stderr)


@dataclass
class ExportGGUFConfig:
    model: str = opt("", "model directory (runs/NAME/final, an HF directory), a .gguf file or a packaged model name")
    out: str = opt("", "GGUF file to write, e.g. model-q8_0.gguf")
    type: str = opt("f16", "tensor type: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 (lmforge quantizes), or a K-quant "
                           "(q4_k_m, q5_k_m, q6_k, ...: needs llama.cpp's llama-quantize or llama-cpp-python)",
                    choices=list(ALL_TYPES))
    adapter: str = opt("", "PEFT LoRA adapter directory to merge into the model first")
    pre_tokenizer: str = opt("", "llama.cpp pre-tokenizer name, when lmforge cannot tell it from tokenizer.json "
                                 "(e.g. llama-bpe, qwen2, smollm, gpt-2)")
    name: str = opt("", "general.name written into the file (default: the output file's name)")


def run_export_gguf(cfg: ExportGGUFConfig) -> int:
    if not cfg.model:
        raise LmforgeError("give the model: lmforge export gguf --model DIR --out FILE.gguf")
    if not cfg.out:
        raise LmforgeError("give the file to write: --out FILE.gguf")
    report = export_gguf(cfg.model, cfg.out, cfg.type, adapter=cfg.adapter or None,
                         pre_tokenizer=cfg.pre_tokenizer or None, name=cfg.name or None)
    _print_report(report, cfg.model + (f" + {cfg.adapter}" if cfg.adapter else ""))
    print(report.path)
    return 0


# ---- Ollama -------------------------------------------------------------------------------------------
_CHATML_GO = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
              "<|im_start|>assistant\n")
_LLAMA3_GO = ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
              "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")


def _go_template(tokenizer) -> tuple[str | None, str | None]:
    """(Ollama Go TEMPLATE, default SYSTEM) equivalent to the tokenizer's chat template, or (None, None).

    Ollama runs Go templates; a Jinja template it does not recognise is not run. So lmforge checks the template
    against the two formats lmforge models use (ChatML, Llama 3) by rendering both on the same conversations.
    """
    if not tokenizer.chat_template:
        return None, None
    conv = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}]

    def chatml(msgs):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n"

    def llama3(msgs):
        return (tokenizer.bos_token or "") + "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in msgs) \
            + "<|start_header_id|>assistant<|end_header_id|>\n\n"

    try:
        plain = tokenizer.apply_chat_template(conv, add_generation_prompt=True)
        with_system = tokenizer.apply_chat_template([{"role": "system", "content": "S"}] + conv,
                                                    add_generation_prompt=True)
    except LmforgeError:
        return None, None
    for render, go in ((chatml, _CHATML_GO), (llama3, _LLAMA3_GO)):
        if with_system != render([{"role": "system", "content": "S"}] + conv):
            continue
        if plain == render(conv):
            return go, None
        # the template adds a default system message when the conversation has none (SmolLM2 does)
        start = "<|im_start|>system\n" if go is _CHATML_GO else "<|start_header_id|>system<|end_header_id|>\n\n"
        end = "<|im_end|>\n" if go is _CHATML_GO else "<|eot_id|>"
        body = plain.removeprefix(tokenizer.bos_token or "") if go is _LLAMA3_GO else plain
        if body.startswith(start) and end in body:
            system = body[len(start):body.index(end)]
            if plain == render([{"role": "system", "content": system}] + conv):
                return go, system
    return None, None


def modelfile(gguf_name: str, tokenizer, stop_ids: list[int], max_seq_len: int) -> tuple[str, list[str]]:
    """The Ollama Modelfile text for a GGUF beside it, and notes for the user."""
    notes = []
    lines = ["# Ollama Modelfile written by `lmforge export ollama`", f"FROM ./{gguf_name}"]
    template, system = _go_template(tokenizer)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template embedded in the GGUF (tokenizer.chat_template) "
                     "when it recognises it")
        if tokenizer.chat_template:
            notes.append("the chat template is neither ChatML nor Llama 3, so the Modelfile has no TEMPLATE; check "
                         "`ollama show --template` after `ollama create`, and add one if it is empty")
    for i in stop_ids:
        text = tokenizer.id_to_token(i)
        if text:
            lines.append(f"PARAMETER stop {_quote(text)}")
    lines.append(f"PARAMETER num_ctx {min(int(max_seq_len), 8192)}")
    return "\n".join(lines) + "\n", notes


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class ExportOllamaConfig:
    model: str = opt("", "model directory (runs/NAME/final, an HF directory), a .gguf file or a packaged model name")
    out: str = opt("", "directory to write model.gguf and Modelfile into")
    type: str = opt("f16", "tensor type of the GGUF (see `lmforge export gguf --help`); q4_k_m / q4_k_s without "
                           "llama.cpp's quantizer: an F16 GGUF that `ollama create --quantize` shrinks",
                    choices=list(ALL_TYPES))
    adapter: str = opt("", "PEFT LoRA adapter directory to merge into the model first")
    pre_tokenizer: str = opt("", "llama.cpp pre-tokenizer name, when lmforge cannot tell it from tokenizer.json")
    name: str = opt("", "the Ollama model name in the printed `ollama create` line (default: the --out folder name)")


def run_export_ollama(cfg: ExportOllamaConfig) -> int:
    if not cfg.model:
        raise LmforgeError("give the model: lmforge export ollama --model DIR --out DIR")
    if not cfg.out:
        raise LmforgeError("give the directory to write: --out DIR")
    kind = cfg.type.lower()
    if kind not in ALL_TYPES:
        raise LmforgeError(f"unknown --type {kind!r}; choose one of {', '.join(ALL_TYPES)}")
    quantize_at_create = None
    if kind not in gguf.EXPORT_TYPES and _quantizer() is None:
        if kind not in _OLLAMA_QUANTS:
            k_quantize(Path("-"), Path("-"), kind)  # raises the message saying what to install
        quantize_at_create, kind = _OLLAMA_QUANTS[kind], "f16"
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_for_export(cfg.model, cfg.adapter or None)
    gguf_name = f"model-{kind}.gguf"
    report = write_export(lm, out / gguf_name, kind, pre_tokenizer=cfg.pre_tokenizer or None, name=cfg.name or None)
    _print_report(report, cfg.model + (f" + {cfg.adapter}" if cfg.adapter else ""))
    text, notes = modelfile(gguf_name, lm.tokenizer, report.stop_ids, lm.model.cfg.max_seq_len)
    (out / "Modelfile").write_text(text, encoding="utf-8")
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    name = cfg.name or out.resolve().name
    line = f"ollama create {name} -f {out / 'Modelfile'}"
    if quantize_at_create:
        line += f" --quantize {quantize_at_create}"
    print(f"wrote {out / 'Modelfile'}; create the Ollama model with:", file=sys.stderr)
    print(line)
    return 0
