"""`lmforge tokenizer train`: train a byte-level BPE tokenizer on text files and save it as an HF tokenizer directory.

    lmforge tokenizer train --files data/a.txt --files data/more/ --vocab-size 8192 --out runs/tok

Each --files entry is a file, a directory (its .txt, .md and .jsonl files, recursively) or a glob pattern. The
result directory loads with Tokenizer.load and with transformers' AutoTokenizer. Progress goes to stderr; the
summary (directory, vocabulary size, bytes per token on the training text) to stdout. The training itself is
bpe.train_bpe.
"""

from __future__ import annotations

import glob
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import opt
from lmforge.errors import LmforgeError
from lmforge.tokenizer.bpe import MIN_VOCAB_SIZE, file_texts, train_bpe

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


@dataclass
class TrainTokenizerConfig:
    files: list[str] = opt(default_factory=list, flag="--file",
                           help="training text: a file, a directory (its .txt/.md/.jsonl files) or a glob; repeat it")
    vocab_size: int = opt(8192, f"vocabulary size, special tokens and 256 bytes included (at least {MIN_VOCAB_SIZE})")
    out: str = opt("tokenizer", "output directory (tokenizer.json, tokenizer_config.json, special_tokens_map.json)")
    min_frequency: int = opt(2, "a pair must occur at least this often to be merged")


def expand_files(entries: list[str]) -> list[Path]:
    """Files named by --files entries (files, directories, globs), in a stable order, without duplicates."""
    found: list[Path] = []
    for entry in entries:
        p = Path(entry)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            inner = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not inner:
                raise LmforgeError(f"directory {p} holds no {'/'.join(TEXT_SUFFIXES)} files")
            found += inner
        elif glob.has_magic(entry):
            matches = sorted(Path(m) for m in glob.glob(entry, recursive=True) if Path(m).is_file())
            if not matches:
                raise LmforgeError(f"no files match {entry!r}")
            found += matches
        else:
            raise LmforgeError(f"training file {entry} does not exist")
    return list(dict.fromkeys(found))


def run(cfg: TrainTokenizerConfig) -> int:
    if not cfg.files:
        raise LmforgeError("no training text given; name files with --files PATH (repeat it for more files)")
    files = expand_files(cfg.files)
    size = sum(f.stat().st_size for f in files)
    print(f"training a {cfg.vocab_size}-id byte-level BPE on {len(files)} file(s), {size / 1e6:.1f} MB",
          file=sys.stderr)
    start = time.time()
    tok = train_bpe([str(f) for f in files], cfg.vocab_size, min_frequency=cfg.min_frequency,
                    show_progress=sys.stderr.isatty())
    seconds = time.time() - start
    if tok.vocab_size < cfg.vocab_size:
        print(f"note: the text supports only {tok.vocab_size} ids (asked for {cfg.vocab_size}); "
              "give more text for a larger vocabulary", file=sys.stderr)
    tok.save(cfg.out)
    # Compression on the first ~1 MB of training text: the figure that sets tokens per document.
    sample = "".join(_head(files, 1 << 20))
    ids = tok.encode(sample, add_special_tokens=False)
    bytes_per_token = len(sample.encode("utf-8")) / max(1, len(ids))
    print(f"saved tokenizer to {cfg.out}: vocab_size {tok.vocab_size}, {bytes_per_token:.2f} bytes/token on the "
          f"training text, trained in {seconds:.1f}s")
    return 0


def _head(files: list[Path], chars: int) -> list[str]:
    """Up to `chars` characters from the start of the training text (as the trainer saw it)."""
    out, left = [], chars
    for f in files:
        for text in file_texts(f):
            out.append(text[:left])
            left -= len(out[-1])
            if left <= 0:
                return out
    return out
