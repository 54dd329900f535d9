"""Corpus readers: turn what a user names (files, folders, globs, or the built-in corpus) into documents.

A *document* is the unit that pretraining separates with EOS: one whole .txt/.md/.py file, or the "text"
field of one line of a .jsonl file. Files are read as UTF-8; bytes that are not UTF-8 are decoded with
U+FFFD replacement characters (never a crash), and every file where that happened is counted and reported
through `CorpusStats` so a user sees it in prepare's output and manifest.

The built-in corpus ("default") is real text found on every machine with Python and copies nobody's text
into this repository: the .py source files (code, comments and docstrings) of the Python standard library
as installed, with tests, installed third-party packages, generated files (the codec tables of `encodings/`,
`pydoc_data/`, the machine's `_sysconfigdata*`) and files that are mostly a literal data table (`is_data_table`)
excluded. Files are taken in a fixed pseudo-random order (a hash of their path relative to the stdlib root),
so a byte cap samples the whole library rather than the alphabetically first packages, and the same Python
version always yields the same corpus. See docs/pretrain.md for its size in tokens.

Tokenization and sharding live in shards.py and pretrain/prepare.py; this module only yields text.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL_SUFFIX = ".jsonl"
SUFFIXES = TEXT_SUFFIXES + (JSONL_SUFFIX,)
BUILTIN = "default"
DEFAULT_MAX_BYTES = 8_000_000  # ~2.6M tokens at vocab 4096: prepare in well under a minute on 2 cores
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings",
                  "pydoc_data"}


@dataclass
class CorpusStats:
    """What reading a corpus found: counts, and the files that needed UTF-8 replacement."""

    files: int = 0
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the decoded text
    replaced_files: list[str] = field(default_factory=list)  # files with bytes that were not UTF-8
    replacement_chars: int = 0  # U+FFFD characters introduced by decoding
    skipped_lines: int = 0  # .jsonl lines without a string "text" field (or not JSON)

    def to_dict(self) -> dict:
        return {"files": self.files, "documents": self.documents, "bytes": self.bytes,
                "replaced_files": self.replaced_files[:100], "replaced_file_count": len(self.replaced_files),
                "replacement_chars": self.replacement_chars, "skipped_jsonl_lines": self.skipped_lines}


def stdlib_root() -> Path:
    """Where this Python's standard library sources are installed."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stable_key(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()


_TABLE_LINE = re.compile(r"""^\s*['"(\d-].*[,:]\s*(#.*)?$""")


def is_data_table(text: str) -> bool:
    """True for a source file that is mostly a literal table (over half its lines are entries like `'x': 1,`).

    Such files (html/entities.py, locale.py's alias table, stringprep.py) teach a model tables, not Python."""
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and sum(1 for line in lines if _TABLE_LINE.match(line)) > len(lines) / 2


def builtin_files(max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[Path]:
    """The built-in corpus: stdlib .py files (tests, generated and data-table files excluded) in a fixed hashed
    order, up to max_bytes in total."""
    root = stdlib_root()
    if not root.is_dir():
        raise LmforgeError(f"the Python standard library was not found at {root}; give --corpus PATH instead")
    found: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("."))
        for name in filenames:
            if not name.endswith(".py") or name.startswith(("test_", "_sysconfigdata")):
                continue  # _sysconfigdata is this machine's build configuration, not shared source
            p = Path(dirpath) / name
            try:
                size = p.stat().st_size
            except OSError:
                continue
            if size:
                found.append((_stable_key(str(p.relative_to(root))), p, size))
    found.sort()
    out, total = [], 0
    for _, p, size in found:
        if max_bytes is not None and total + size > max_bytes and out:
            continue  # a smaller file further on may still fit; the order stays deterministic
        if is_data_table(p.read_text(encoding="utf-8", errors="replace")):
            continue
        out.append(p)
        total += size
    if not out:
        raise LmforgeError(f"no .py files found in the standard library at {root}; give --corpus PATH instead")
    return out


def resolve(specs: list[str], max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[Path]:
    """Files named by `specs`: paths, folders (searched recursively), globs, or "default" (the built-in corpus).

    Only .txt .md .py .jsonl files are taken from folders and globs; a file named directly must have one of those
    suffixes too. The order is deterministic (sorted within each spec, specs in the given order, no duplicates).
    """
    if not specs:
        raise LmforgeError("no corpus given: pass --corpus default, or --corpus PATH (files, folders or globs)")
    files: list[Path] = []
    for spec in specs:
        if spec == BUILTIN:
            files += builtin_files(max_bytes)
            continue
        p = Path(spec).expanduser()
        if p.is_dir():
            matches = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES
                             and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not matches:
                raise LmforgeError(f"folder {p} holds no {'/'.join(SUFFIXES)} files")
            files += matches
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise LmforgeError(f"{p}: unsupported file type {p.suffix or '(none)'}; "
                                   f"the corpus reads {', '.join(SUFFIXES)}")
            files.append(p)
        elif any(c in spec for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True)
                             if Path(m).is_file() and Path(m).suffix in SUFFIXES)
            if not matches:
                raise LmforgeError(f"the pattern {spec!r} matches no {'/'.join(SUFFIXES)} files")
            files += matches
        else:
            raise LmforgeError(f"corpus path {spec!r} does not exist (give files, folders, globs, or 'default')")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _decode(raw: bytes, path: Path, stats: CorpusStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        stats.replaced_files.append(str(path))
        stats.replacement_chars += text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
        return text


def read_file(path: Path, stats: CorpusStats) -> Iterator[str]:
    """The documents of one file (see the module docstring), updating `stats`."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None
    stats.files += 1
    text = _decode(raw, path, stats)
    if path.suffix != JSONL_SUFFIX:
        if text.strip():
            stats.documents += 1
            stats.bytes += len(text.encode("utf-8"))
            yield text
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            stats.skipped_lines += 1
            continue
        doc = record.get("text") if isinstance(record, dict) else None
        if not isinstance(doc, str):
            stats.skipped_lines += 1
            continue
        if doc.strip():
            stats.documents += 1
            stats.bytes += len(doc.encode("utf-8"))
            yield doc


def read_documents(files: list[Path], stats: CorpusStats | None = None) -> Iterator[tuple[Path, str]]:
    """(file, document text) for every non-blank document of `files`, in order."""
    stats = stats if stats is not None else CorpusStats()
    for f in files:
        for doc in read_file(f, stats):
            yield f, doc
