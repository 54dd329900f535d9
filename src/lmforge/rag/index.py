"""A persistent vector index of document chunks: build, update in place, search.

On disk an index is a directory:

    manifest.json        format, embedder, chunking, per-file content hashes and chunk ids, current generation
    index-G.faiss        faiss IndexIDMap2 over IndexFlatIP (exact inner product over unit vectors = cosine)
    chunks-G.jsonl       one JSON object per chunk: id, source, start, end, text (the sidecar; no pickle anywhere)

An update writes generation G+1's two data files, then replaces manifest.json atomically (the manifest names the
generation), then deletes generation G: a run killed at any point leaves the previous index whole.

Updating: each given file's SHA-256 is compared with the manifest's. Unchanged files are skipped (not even
embedded), changed files have their old chunk ids removed from the faiss index and new chunks added, new files are
added. Files indexed earlier but not given this time stay, unless `prune` is set (then files that no longer exist
on disk are dropped). Flat (exact) search is right up to a few million chunks on a laptop; the embedder, not the
search, is the cost of building.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import LmforgeError
from lmforge.rag.chunk import CODE_SUFFIXES, Chunk, chunk_text

if TYPE_CHECKING:
    from lmforge.rag.embed import Embedder

FORMAT = "lmforge-rag-index"
VERSION = 1
DEFAULT_CHUNK_CHARS = 800
DEFAULT_OVERLAP_CHARS = 160
# Files taken from a directory (a file named explicitly is always read, whatever its suffix).
TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".rst", ".adoc", ".org", ".tex", ".csv", ".tsv", ".log",
                           ".jsonl", ".text"}) | CODE_SUFFIXES


@dataclass
class Hit:
    """One retrieved chunk: rank 1 is the best; score is the cosine similarity to the query."""

    rank: int
    score: float
    source: str
    start: int
    end: int
    text: str
    id: int

    def to_dict(self) -> dict:
        return asdict(self)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise LmforgeError("RAG needs faiss: pip install 'lmforge[rag]' (or pip install faiss-cpu)") from None
    return faiss


def display_path(path: Path) -> str:
    """A file's name as indexes record it: relative to the working directory when under it, else absolute."""
    p = path.resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def find_documents(paths: list[str]) -> list[Path]:
    """Text files named by `paths` (files, or directories searched recursively), in a stable order."""
    if not paths:
        raise LmforgeError("no documents given: pass --docs DIR_OR_FILE (repeat it, or separate with commas)")
    found: dict[Path, None] = {}
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_file():
            found[p.resolve()] = None
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if any(part.startswith(".") for part in rel) or not f.is_file():
                    continue  # hidden files and folders (.git, .venv) are never documents
                if f.suffix.lower() in TEXT_SUFFIXES:
                    found[f.resolve()] = None
        else:
            raise LmforgeError(f"document path {raw} does not exist")
    if not found:
        raise LmforgeError(f"no text files found under {', '.join(paths)} (looked for {', '.join(sorted(TEXT_SUFFIXES)[:8])}, ...); "
                           "name files explicitly to index other suffixes")
    return list(found)


def read_document(path: Path) -> tuple[str, str]:
    """(text, sha256 of the bytes). Raises LmforgeError for binary or non-UTF-8 files."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise LmforgeError(f"{path} looks binary (NUL bytes); index text files only")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8 first") from None
    return text, hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Index:
    """An open index: its manifest, chunk records, faiss index, and (loaded on first use) its embedder."""

    def __init__(self, path: Path, manifest: dict, chunks: dict[int, dict], faiss_index: Any,
                 embedder: Embedder | None = None):
        self.path = path
        self.manifest = manifest
        self.chunks = chunks  # id -> {"source", "start", "end", "text"}
        self.faiss_index = faiss_index
        self._embedder = embedder

    # ---- opening ----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, embedder: Embedder, chunk_chars: int = DEFAULT_CHUNK_CHARS,
               overlap_chars: int = DEFAULT_OVERLAP_CHARS) -> Index:
        """A new, empty index in memory (nothing is written until save())."""
        faiss = _faiss()
        if chunk_chars < 50 or not 0 <= overlap_chars < chunk_chars:
            raise LmforgeError(f"chunking needs chunk_chars >= 50 and 0 <= overlap_chars < chunk_chars; got "
                               f"{chunk_chars} and {overlap_chars}")
        manifest = {"format": FORMAT, "version": VERSION, "generation": 0,
                    "embedder": {"name": embedder.name, "dim": embedder.dim, "max_length": embedder.max_length},
                    "metric": "inner_product", "normalized": True,
                    "chunking": {"chunk_chars": chunk_chars, "overlap_chars": overlap_chars},
                    "next_id": 0, "files": {}, "updated": None}
        return cls(Path(path), manifest, {}, faiss.IndexIDMap2(faiss.IndexFlatIP(embedder.dim)), embedder)

    @staticmethod
    def exists(path: str | Path) -> bool:
        return (Path(path) / "manifest.json").is_file()

    @classmethod
    def open(cls, path: str | Path, embedder: Embedder | None = None) -> Index:
        """Open an index directory written by save(); the embedder loads lazily unless given."""
        faiss = _faiss()
        p = Path(path)
        mf = p / "manifest.json"
        if not mf.is_file():
            hint = " (it is a directory, but not an index)" if p.is_dir() else ""
            raise LmforgeError(f"{p} is not a RAG index{hint}; build one with: lmforge rag index --docs DIR --out {p}")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{mf} is damaged ({e}); rebuild the index") from None
        if manifest.get("format") != FORMAT:
            raise LmforgeError(f"{mf} is not an lmforge RAG index manifest")
        if manifest.get("version", 0) > VERSION:
            raise LmforgeError(f"{p} was written by a newer lmforge (index format {manifest['version']}); upgrade lmforge")
        g = manifest["generation"]
        chunks: dict[int, dict] = {}
        cpath = p / f"chunks-{g}.jsonl"
        ipath = p / f"index-{g}.faiss"
        if not cpath.is_file() or not ipath.is_file():
            raise LmforgeError(f"{p} lacks {cpath.name} or {ipath.name}; the index is incomplete: rebuild it")
        with open(cpath, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    chunks[int(rec.pop("id"))] = rec
        index = faiss.read_index(str(ipath))
        if index.ntotal != len(chunks):
            raise LmforgeError(f"{p}: the vector index holds {index.ntotal} vectors but the sidecar {len(chunks)} "
                               "chunks; the index is damaged: rebuild it")
        if embedder is not None and embedder.name != manifest["embedder"]["name"]:
            raise LmforgeError(f"{p} was built with embedder {manifest['embedder']['name']!r}, not {embedder.name!r}; "
                               "use the same embedder or build a new index")
        return cls(p, manifest, chunks, index, embedder)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            from lmforge.rag.embed import Embedder

            self._embedder = Embedder.load(self.manifest["embedder"]["name"])
            if self._embedder.dim != self.manifest["embedder"]["dim"]:
                raise LmforgeError(f"embedder {self._embedder.name} gives {self._embedder.dim}-d vectors but "
                                   f"{self.path} holds {self.manifest['embedder']['dim']}-d ones; rebuild the index")
        return self._embedder

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest["files"]

    # ---- updating ---------------------------------------------------------------------------------------
    def remove_file(self, source: str) -> int:
        """Drop a file's chunks; returns how many were removed."""
        import numpy as np

        entry = self.files.pop(source, None)
        if not entry or not entry["ids"]:
            return 0
        ids = np.asarray(entry["ids"], dtype=np.int64)
        self.faiss_index.remove_ids(ids)
        for i in entry["ids"]:
            self.chunks.pop(i, None)
        return len(ids)

    def add_documents(self, paths: list[Path], batch_size: int = 32, prune: bool = False,
                      progress: Any = None) -> dict:
        """Index new and changed files among `paths`; returns counts of files and chunks, and embed_seconds.

        `progress(done_chunks, total_chunks)` is called as embedding proceeds, if given.
        """
        import numpy as np

        stats = {"files_added": 0, "files_changed": 0, "files_unchanged": 0, "files_removed": 0,
                 "chunks_added": 0, "chunks_removed": 0, "embed_seconds": 0.0}
        ck = self.manifest["chunking"]
        todo: list[tuple[str, str, list]] = []  # (source, sha, chunks)
        for path in paths:
            source = display_path(path)
            text, sha = read_document(path)
            old = self.files.get(source)
            if old and old["sha256"] == sha:
                stats["files_unchanged"] += 1
                continue
            stats["files_changed" if old else "files_added"] += 1
            code = path.suffix.lower() in CODE_SUFFIXES
            chunks = chunk_text(text, ck["chunk_chars"], ck["overlap_chars"], code=code)
            todo.append((source, sha, self._fit_window(text, chunks, code)))
        if prune:
            for source in list(self.files):
                if not Path(source).is_file():
                    stats["chunks_removed"] += self.remove_file(source)
                    stats["files_removed"] += 1
        total = sum(len(c) for _, _, c in todo)
        done = 0
        for source, sha, chunks in todo:
            stats["chunks_removed"] += self.remove_file(source)
            ids = list(range(self.manifest["next_id"], self.manifest["next_id"] + len(chunks)))
            self.manifest["next_id"] += len(chunks)
            for b in range(0, len(chunks), 256):  # embed in slices so progress moves on big files
                part = chunks[b:b + 256]
                embedder = self.embedder  # loads on first use, outside the timing below
                t0 = time.perf_counter()
                vecs = embedder.encode([c.text for c in part], batch_size=batch_size)
                stats["embed_seconds"] += time.perf_counter() - t0
                self.faiss_index.add_with_ids(vecs, np.asarray(ids[b:b + len(part)], dtype=np.int64))
                done += len(part)
                if progress is not None:
                    progress(done, total)
            for i, c in zip(ids, chunks):
                self.chunks[i] = {"source": source, "start": c.start, "end": c.end, "text": c.text}
            self.files[source] = {"sha256": sha, "ids": ids}
            stats["chunks_added"] += len(chunks)
        return stats

    def _fit_window(self, text: str, chunks: list[Chunk], code: bool) -> list[Chunk]:
        """Re-split chunks longer than the embedder's window (dense text, code), so no chunk is embedded only in part.

        Characters are a proxy for tokens; where the proxy fails, the chunk is chunked again with a limit shrunk in
        proportion, and its pieces' offsets moved back into the document.
        """
        window = self.embedder.max_length
        counts = self.embedder.count_tokens([c.text for c in chunks]) if chunks else []
        out: list[Chunk] = []
        for c, n in zip(chunks, counts):
            if n <= window or len(c.text) < 100:
                out.append(c)
                continue
            limit = max(50, int(len(c.text) * window / n * 0.9))
            overlap = min(self.manifest["chunking"]["overlap_chars"], limit // 5)
            for piece in self._fit_window(c.text, chunk_text(c.text, limit, overlap, code=code), code):
                out.append(Chunk(piece.text, c.start + piece.start, c.start + piece.end))
        return out

    def save(self) -> None:
        """Write the next generation of data files, then the manifest that names it, then drop the old one."""
        faiss = _faiss()
        self.path.mkdir(parents=True, exist_ok=True)
        old = self.manifest["generation"] if Index.exists(self.path) else None
        g = self.manifest["generation"] + 1
        lines = [json.dumps({"id": i, **rec}, ensure_ascii=False) for i, rec in sorted(self.chunks.items())]
        _atomic_write(self.path / f"chunks-{g}.jsonl", ("\n".join(lines) + ("\n" if lines else "")).encode())
        tmp = self.path / f"index-{g}.faiss.tmp"
        faiss.write_index(self.faiss_index, str(tmp))
        os.replace(tmp, self.path / f"index-{g}.faiss")
        manifest = {**self.manifest, "generation": g, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _atomic_write(self.path / "manifest.json", json.dumps(manifest, indent=1).encode())
        self.manifest = manifest
        for name in (f"chunks-{old}.jsonl", f"index-{old}.faiss") if old is not None else ():
            (self.path / name).unlink(missing_ok=True)

    # ---- searching --------------------------------------------------------------------------------------
    def search(self, query: str, top_k: int = 5) -> list[Hit]:
        """The top_k chunks most similar to `query`, best first."""
        return self.search_many([query], top_k)[0]

    def search_many(self, queries: list[str], top_k: int = 5) -> list[list[Hit]]:
        if top_k < 1:
            raise LmforgeError(f"top_k must be at least 1, got {top_k}")
        if not self.chunks:
            return [[] for _ in queries]
        vecs = self.embedder.encode(list(queries))
        scores, ids = self.faiss_index.search(vecs, min(top_k, len(self.chunks)))
        out = []
        for srow, irow in zip(scores, ids):
            hits = []
            for s, i in zip(srow.tolist(), irow.tolist()):
                if i < 0:
                    continue
                rec = self.chunks[i]
                hits.append(Hit(len(hits) + 1, float(s), rec["source"], rec["start"], rec["end"], rec["text"], i))
            out.append(hits)
        return out
