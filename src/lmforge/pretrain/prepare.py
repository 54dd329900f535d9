"""`lmforge prepare`: corpus -> tokenizer -> token shards, the input of `lmforge pretrain`.

    lmforge prepare --corpus default --out data/default
    lmforge prepare --corpus notes/ --corpus 'papers/*.md' --corpus chat.jsonl --vocab-size 8192 --out data/mine

Steps: resolve the corpus (lmforge.data.corpus: files, folders, globs, or the built-in stdlib corpus), train a
byte-level BPE tokenizer on it (or take --tokenizer DIR), tokenize every document with the tokenizers library's
parallel batch encoder (all cores), append EOS after each document, and write uint16/uint32 shards of a train
and a held-out validation split (lmforge.data.shards) plus manifest.json: sources, counts, corpus statistics
(files decoded with UTF-8 replacement are listed), the tokenizer's hash.

Validation documents are chosen by a hash of (file, document number), so the split is stable when files are
added; when no document falls in it (a tiny corpus), the tail of the training tokens becomes the validation
split. The output directory is written atomically and fingerprinted (file paths, sizes and modification times,
and every setting): running the same command again reuses it instantly, and any change rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lmforge.config import opt
from lmforge.data import corpus as corpora
from lmforge.data.shards import (
    DEFAULT_SHARD_TOKENS,
    FORMAT_VERSION,
    MANIFEST,
    ShardWriter,
    TokenShards,
    dtype_for_vocab,
    read_manifest,
)
from lmforge.errors import LmforgeError

_BATCH_BYTES = 4 << 20  # text per encode_batch call


@dataclass
class PrepareConfig:
    corpus: list[str] = opt(default_factory=lambda: [corpora.BUILTIN],
                            help="'default' (the built-in stdlib corpus), or a file, folder or glob of "
                                 ".txt/.md/.py/.jsonl; repeat --corpus for more")
    out: str = opt("data/default", "output directory for the tokenizer, shards and manifest", flag="--out")
    vocab_size: int = opt(4096, "vocabulary size of the tokenizer to train (special tokens and bytes included)")
    tokenizer: str | None = opt(None, "use this tokenizer directory instead of training one")
    val_fraction: float = opt(0.01, "fraction of documents held out for validation")
    builtin_bytes: int = opt(corpora.DEFAULT_MAX_BYTES, "size cap of the built-in corpus in bytes")
    tokenizer_bytes: int = opt(200_000_000, "train the tokenizer on at most this many bytes of text")
    shard_tokens: int = opt(DEFAULT_SHARD_TOKENS, "tokens per shard file")
    force: bool = opt(False, "rebuild even when the inputs are unchanged")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(cfg: PrepareConfig, files: list[Path]) -> str:
    """A hash of everything the output depends on: the files (path, size, mtime) and the settings."""
    h = hashlib.sha256()
    tok = None
    if cfg.tokenizer:
        tj = Path(cfg.tokenizer) / "tokenizer.json"
        tok = _sha256(tj) if tj.is_file() else str(cfg.tokenizer)
    settings = {"format": FORMAT_VERSION, "vocab_size": cfg.vocab_size, "tokenizer": tok,
                "val_fraction": cfg.val_fraction, "tokenizer_bytes": cfg.tokenizer_bytes,
                "shard_tokens": cfg.shard_tokens}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _reusable(out: Path, fp: str) -> dict | None:
    if not (out / MANIFEST).is_file():
        return None
    try:
        m = read_manifest(out)
        if m.get("fingerprint") != fp:
            return None
        for split in ("train", "val"):
            TokenShards(out, split)  # checks every shard's presence and size
        return m
    except LmforgeError:
        return None


def _is_val(f: Path, n: int, fraction: float) -> bool:
    digest = hashlib.sha1(f"{f}\0{n}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _train_tokenizer(cfg: PrepareConfig, files: list[Path]):
    from lmforge.tokenizer import train_bpe

    budget = [cfg.tokenizer_bytes]

    def texts():
        for _, doc in corpora.read_documents(files, corpora.CorpusStats()):
            if budget[0] <= 0:
                return
            budget[0] -= len(doc)
            yield doc

    t = time.time()
    tok = train_bpe(texts(), cfg.vocab_size)
    _log(f"trained a {tok.vocab_size}-token byte-level BPE in {time.time() - t:.1f}s")
    return tok


def _progress(total: int):
    if not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("[bold]tokenize"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                 console=Console(stderr=True), transient=True)
    p.start()
    p.add_task("tokenize", total=total)
    return p


def _move_tail_to_val(tmp: Path, train: ShardWriter, val: ShardWriter, fraction: float) -> tuple[int, int]:
    """A corpus too small for any held-out document: move the last tokens of train into val (writers closed)."""
    import numpy as np

    last = train.shards[-1]
    path = tmp / last["file"]
    k = max(1, int(train.tokens * max(fraction, 0.05)))
    k = min(k, last["tokens"] - 1) if last["tokens"] > 1 else 0
    if k <= 0:
        raise LmforgeError("the corpus is too small to hold out a validation split; give more text")
    arr = np.fromfile(path, dtype=train.dtype)
    val.write(arr[-k:])
    val.close()
    with open(path, "r+b") as fh:
        fh.truncate((arr.size - k) * train.dtype.itemsize)
    last["tokens"] -= k
    train.tokens -= k
    return k, int(arr[-k:].size)


def run(cfg: PrepareConfig) -> int:
    import numpy as np

    from lmforge.checkpoint import atomic_dir
    from lmforge.tokenizer import Tokenizer

    if not 0 < cfg.val_fraction < 0.5:
        raise LmforgeError(f"--val-fraction must be between 0 and 0.5, got {cfg.val_fraction}")
    start = time.time()
    files = corpora.resolve(cfg.corpus, cfg.builtin_bytes)
    out = Path(cfg.out)
    fp = fingerprint(cfg, files)
    if not cfg.force and (m := _reusable(out, fp)):
        _log(f"reusing {out}: same inputs and settings as before (--force rebuilds)")
        print(f"{out}: {m['splits']['train']['tokens']:,} train + {m['splits']['val']['tokens']:,} val tokens "
              f"(reused)")
        return 0
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise LmforgeError(f"{out} exists and is not a prepared data directory; choose a new or empty --out")
    total_bytes = sum(f.stat().st_size for f in files)
    _log(f"corpus: {len(files)} file(s), {total_bytes / 1e6:.1f} MB")

    if cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
        _log(f"using the tokenizer in {cfg.tokenizer} ({tok.vocab_size} tokens)")
    else:
        tok = _train_tokenizer(cfg, files)
    if tok.eos_id is None:
        raise LmforgeError("the tokenizer has no EOS token, which separates documents; use one that has")
    eos = tok.eos_id
    dtype = dtype_for_vocab(tok.vocab_size)

    stats = corpora.CorpusStats()
    counts = {"train": [0, 0], "val": [0, 0]}  # documents, bytes
    progress = _progress(total_bytes)
    with atomic_dir(out) as tmp:
        tok.save(tmp / "tokenizer")
        writers = {s: ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
        batch: list[tuple[str, str]] = []
        batch_bytes = 0
        done_bytes = 0

        def flush():
            ids = tok.encode_batch([doc for _, doc in batch], add_special_tokens=False)
            for (split, doc), seq in zip(batch, ids):
                writers[split].write(np.array(seq + [eos], dtype=np.int64))
                counts[split][0] += 1
                counts[split][1] += len(doc.encode("utf-8"))
            batch.clear()

        current, n = None, 0
        for f, doc in corpora.read_documents(files, stats):
            if f != current:
                if current is not None:
                    done_bytes += current.stat().st_size
                current, n = f, 0
                if progress is not None:
                    progress.update(progress.task_ids[0], completed=done_bytes)
            split = "val" if _is_val(f, n, cfg.val_fraction) else "train"
            n += 1
            batch.append((split, doc))
            batch_bytes += len(doc)
            if batch_bytes >= _BATCH_BYTES:
                flush()
                batch_bytes = 0
        if batch:
            flush()
        if progress is not None:
            progress.stop()
        for w in writers.values():
            w.close()
        if writers["train"].tokens == 0:
            raise LmforgeError(f"the corpus ({', '.join(cfg.corpus)}) holds no text: every file is empty or blank")
        notes = []
        if writers["val"].tokens == 0:
            k, _ = _move_tail_to_val(tmp, writers["train"], writers["val"], cfg.val_fraction)
            moved_bytes = int(counts["train"][1] * k / max(1, writers["train"].tokens + k))
            counts["val"][1], counts["train"][1] = moved_bytes, counts["train"][1] - moved_bytes
            notes.append(f"no whole document fell in the validation split; its last {k} tokens were held out")
        manifest = {
            "format": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "fingerprint": fp,
            "sources": list(cfg.corpus),
            "files": [str(f) for f in files] if len(files) <= 2000 else f"{len(files)} files",
            "tokenizer": {"dir": "tokenizer", "sha256": _sha256(tmp / "tokenizer" / "tokenizer.json"),
                          "vocab_size": tok.vocab_size, "trained": cfg.tokenizer is None,
                          "source": cfg.tokenizer},
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "eos_id": eos,
            "bos_id": tok.bos_id,
            "val_fraction": cfg.val_fraction,
            "splits": {s: {"shards": w.close(), "tokens": w.tokens, "documents": counts[s][0],
                           "bytes": counts[s][1]} for s, w in writers.items()},
            "corpus": stats.to_dict(),
            "notes": notes,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for note in notes:
        _log(f"note: {note}")
    if stats.replaced_files:
        shown = ", ".join(stats.replaced_files[:5]) + (" ..." if len(stats.replaced_files) > 5 else "")
        _log(f"warning: {len(stats.replaced_files)} file(s) were not valid UTF-8; {stats.replacement_chars} "
             f"undecodable byte sequence(s) became U+FFFD: {shown}")
    if stats.skipped_lines:
        _log(f"warning: skipped {stats.skipped_lines} .jsonl line(s) that were not JSON objects with a \"text\" string")
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    per_tok = (tr["bytes"] + va["bytes"]) / max(1, tr["tokens"] + va["tokens"])
    print(f"{out}: {tr['tokens']:,} train tokens ({tr['documents']:,} documents) + {va['tokens']:,} validation "
          f"tokens, vocab {tok.vocab_size} ({dtype.name}), {per_tok:.2f} bytes/token, "
          f"{time.time() - start:.1f}s")
    return 0
