"""Token shards on disk, their manifest, the resumable loader that batches them, and the validation windows.

Format (a prepared data directory, written by pretrain/prepare.py):
  manifest.json          format version, dtype, vocab size, eos id, tokenizer hash, sources, per-split token
                         and byte counts, and the shard list of each split
  tokenizer/             the tokenizer the ids belong to
  train-00000.bin ...    raw little-endian token ids (uint16 when the vocabulary fits, else uint32), documents
  val-00000.bin ...      separated by EOS; read back with numpy.memmap, so no split is ever loaded whole

The loader cuts a split into non-overlapping windows of seq_len + 1 tokens (inputs are the first seq_len,
targets the last seq_len, so every token is a target once per epoch) and visits them in a seeded random
order that is reshuffled each epoch. Its whole position is one integer, the number of windows consumed
globally, so resuming is exact and a run under N data-parallel ranks reads, in each micro-step, the same
windows that one process with an N-times larger batch would (rank r takes the r-th slice of the global
batch). Documents are not masked from each other inside a window (as in GPT-2/nanoGPT): EOS marks the seam.

Validation (`validation_batches`) reads the first windows of a split in order, never shuffled, so every
evaluation of every run on the same data scores the same tokens (pretrain and cpt both use it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data import IGNORE_INDEX
from lmforge.errors import LmforgeError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 27  # 128M tokens: 256 MB per uint16 shard


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token ids to <split>-NNNNN.bin files of at most shard_tokens ids each."""

    def __init__(self, out_dir: str | Path, split: str, dtype: np.dtype | str,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS):
        self.dir, self.split, self.dtype = Path(out_dir), split, np.dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict] = []
        self._fh = None
        self._in_shard = 0
        self.tokens = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._fh = open(self.dir / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def write(self, ids: np.ndarray | list[int]) -> None:
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids outside the range of {self.dtype}")
        arr = arr.astype(self.dtype.newbyteorder("<"), copy=False)
        while arr.size:
            if self._fh is None or self._in_shard >= self.shard_tokens:
                self.close_shard()
                self._open()
            take = min(arr.size, self.shard_tokens - self._in_shard)
            self._fh.write(arr[:take].tobytes())
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            self.tokens += take
            arr = arr[take:]

    def close_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> list[dict]:
        self.close_shard()
        return self.shards


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared data directory, or a clear error saying how to make one."""
    d = Path(data_dir)
    f = d / MANIFEST
    if not d.is_dir():
        raise LmforgeError(f"data directory {d} does not exist; make it with: lmforge prepare --corpus default --out {d}")
    if not f.is_file():
        raise LmforgeError(f"{d} has no {MANIFEST} (no token shards); make it with: lmforge prepare --corpus ... --out {d}")
    try:
        m = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{f} is damaged ({e}); run lmforge prepare again") from None
    if m.get("format") != FORMAT_VERSION:
        raise LmforgeError(f"{f} has format {m.get('format')!r}; this lmforge reads format {FORMAT_VERSION}: "
                           "run lmforge prepare again")
    return m


class TokenShards:
    """One split of a prepared data directory as a single virtual array of token ids (memory-mapped)."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir)
        info = self.manifest.get("splits", {}).get(split)
        if not info or not info.get("shards"):
            raise LmforgeError(f"{self.dir} has no '{split}' shards; run lmforge prepare again")
        self.split = split
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.arrays: list[np.ndarray] = []
        for s in info["shards"]:
            f = self.dir / s["file"]
            expected = s["tokens"] * self.dtype.itemsize
            if not f.is_file() or f.stat().st_size != expected:
                raise LmforgeError(f"shard {f} is missing or has the wrong size (expected {expected} bytes); "
                                   "run lmforge prepare again")
            if s["tokens"]:
                self.arrays.append(np.memmap(f, dtype=self.dtype, mode="r"))
        self.offsets = np.cumsum([0] + [a.size for a in self.arrays])
        self.bytes = int(info.get("bytes", 0))  # UTF-8 bytes of the split's text (for bits per byte)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Token ids [start, stop) as int64, across shard boundaries."""
        if start < 0 or stop > len(self) or start > stop:
            raise IndexError(f"[{start}, {stop}) outside 0..{len(self)}")
        parts = []
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            a, base = self.arrays[i], int(self.offsets[i])
            end = min(stop, base + a.size)
            parts.append(np.asarray(a[start - base:end - base], dtype=np.int64))
            start, i = end, i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @property
    def tokens_per_byte(self) -> float | None:
        return len(self) / self.bytes if self.bytes else None


class TokenLoader:
    """Batches of (inputs, targets) [batch_size, seq_len] from seeded, per-epoch shuffled windows.

    `batch_size` is this rank's micro-batch; the global micro-batch is batch_size * world_size. The state is
    {"consumed": windows consumed globally, ...}; load_state_dict checks that seq_len and seed match.
    """

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if seq_len < 1 or batch_size < 1:
            raise LmforgeError("seq_len and batch_size must be at least 1")
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.n_windows = (len(shards) - 1) // seq_len
        if self.n_windows < 1:
            raise LmforgeError(f"the {shards.split} split of {shards.dir} has {len(shards)} tokens, fewer than "
                               f"seq_len + 1 = {seq_len + 1}; lower --seq-len or prepare more text")
        self.consumed = 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def epoch(self) -> float:
        return self.consumed / self.n_windows

    def _window(self, w: int) -> int:
        """Start token of global window number w."""
        epoch, j = divmod(w, self.n_windows)
        if not self.shuffle:
            return j * self.seq_len
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return int(self._perm[j]) * self.seq_len

    def next_batch(self) -> tuple[Any, Any]:
        """This rank's (inputs, targets), int64 tensors [batch_size, seq_len]; advances the global position."""
        import torch

        first = self.consumed + self.rank * self.batch_size
        rows = np.stack([self.shards.read(s, s + self.seq_len + 1)
                         for s in (self._window(first + i) for i in range(self.batch_size))])
        self.consumed += self.batch_size * self.world_size
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seq_len": self.seq_len, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len") != self.seq_len or state.get("seed") != self.seed:
            raise LmforgeError(f"the checkpoint's data position was made with seq_len={state.get('seq_len')}, "
                               f"seed={state.get('seed')}; this run has seq_len={self.seq_len}, seed={self.seed}. "
                               "Use the same values to resume, or start a new run directory")
        self.consumed = int(state["consumed"])


def validation_batches(shards: TokenShards, seq_len: int, batch_size: int, eval_tokens: int, rank: int = 0,
                       world_size: int = 1) -> Iterator[tuple[Any, Any]]:
    """This rank's share of the first eval_tokens of `shards` as (inputs, targets) int64 batches [<=batch_size, T].

    Windows of seq_len + 1 tokens (shorter when the split is) are dealt round-robin to ranks. Every rank yields the
    same number of batches (an FSDP forward is collective): a rank short of a window repeats one with every target
    set to IGNORE_INDEX, so it adds nothing to the loss.
    """
    import torch

    seq = min(seq_len, len(shards) - 1)
    n = min((len(shards) - 1) // seq, max(1, eval_tokens // seq))
    per_rank = -(-n // world_size)
    mine = [rank + i * world_size for i in range(per_rank)]
    for i in range(0, per_rank, batch_size):
        ws = mine[i:i + batch_size]
        batch = torch.from_numpy(np.stack([shards.read(w % n * seq, w % n * seq + seq + 1) for w in ws]))
        x, y = batch[:, :-1], batch[:, 1:].clone()
        y[torch.tensor([w >= n for w in ws])] = IGNORE_INDEX
        yield x, y
