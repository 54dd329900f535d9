"""The `lmforge rag index` and `lmforge rag search` verbs: configs and run functions, no retrieval logic.

    lmforge rag index --docs DIR_OR_FILES --out indexes/mydocs      # build, or update an existing index in place
    lmforge rag search --index indexes/mydocs "a question" --top-k 5
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import opt
from lmforge.errors import LmforgeError


def _split_paths(values: list[str]) -> list[str]:
    """--docs may repeat and may hold comma-separated paths (a path that exists whole is never split)."""
    out = []
    for v in values:
        out.extend([v] if Path(v).exists() or "," not in v else [p for p in v.split(",") if p])
    return out


@dataclass
class IndexConfig:
    docs: list[str] = opt(default_factory=list, help="document files or directories (repeat, or comma-separate)")
    out: str = opt("", help="index directory; an existing index there is updated with new and changed files")
    embedder: str | None = opt(None, help="local sentence-encoder directory (default: packaged all-MiniLM-L6-v2)")
    chunk_chars: int | None = opt(None, help="most characters in a chunk (default 800, or the index's own)")
    overlap_chars: int | None = opt(None, help="characters of overlap between chunks (default 160, or the index's own)")
    prune: bool = opt(False, help="also drop indexed files that no longer exist on disk")
    batch_size: int = opt(32, help="texts per embedding batch")


def run_index(cfg: IndexConfig) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lmforge.rag.embed import Embedder, resolve_embedder
    from lmforge.rag.index import DEFAULT_CHUNK_CHARS, DEFAULT_OVERLAP_CHARS, Index, find_documents

    if not cfg.out:
        raise LmforgeError("say where the index goes: --out DIR (an existing index there is updated)")
    paths = find_documents(_split_paths(cfg.docs))
    out = Path(cfg.out)
    t0 = time.perf_counter()
    if Index.exists(out):
        index = Index.open(out)
        name = resolve_embedder(cfg.embedder)[0] if cfg.embedder else index.manifest["embedder"]["name"]
        if name != index.manifest["embedder"]["name"]:
            raise LmforgeError(f"{out} was built with embedder {index.manifest['embedder']['name']!r}; updating it "
                               f"with {name!r} would mix vector spaces. Drop --embedder or write a new --out")
        ck = index.manifest["chunking"]
        for key in ("chunk_chars", "overlap_chars"):
            given = getattr(cfg, key)
            if given is not None and given != ck[key]:
                raise LmforgeError(f"{out} was built with --{key.replace('_', '-')} {ck[key]}; use the same value "
                                   "or write a new --out")
        print(f"updating {out} ({len(index)} chunks from {len(index.files)} files)", file=sys.stderr)
    else:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise LmforgeError(f"{out} exists and is not a RAG index; choose another --out")
        index = Index.create(out, Embedder.load(cfg.embedder), cfg.chunk_chars or DEFAULT_CHUNK_CHARS,
                             DEFAULT_OVERLAP_CHARS if cfg.overlap_chars is None else cfg.overlap_chars)
    console = _stderr_console()
    with Progress(TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
                  TimeRemainingColumn(), transient=True, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("embed", total=None)
        stats = index.add_documents(paths, batch_size=cfg.batch_size, prune=cfg.prune,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
    index.save()
    t_total = time.perf_counter() - t0
    t_embed = stats["embed_seconds"]
    n_docs = stats["files_added"] + stats["files_changed"]
    print(f"{out}: {stats['files_added']} new, {stats['files_changed']} changed, {stats['files_unchanged']} "
          f"unchanged, {stats['files_removed']} removed files; +{stats['chunks_added']} -{stats['chunks_removed']} "
          f"chunks; {len(index)} chunks from {len(index.files)} files")
    rate = f" ({n_docs / t_embed:.1f} docs/s, {stats['chunks_added'] / t_embed:.1f} chunks/s)" if t_embed > 0 and n_docs else ""
    print(f"took {t_total:.1f}s in all, embedding {t_embed:.2f}s{rate}", file=sys.stderr)
    return 0


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


@dataclass
class SearchConfig:
    query: str = opt("", help="the question to retrieve for", positional=True)
    index: str = opt("", help="index directory made by `lmforge rag index`")
    top_k: int = opt(5, help="how many chunks to return")
    json: bool = opt(False, help="print the hits as JSON")
    full: bool = opt(False, help="print whole chunks instead of one-line snippets")


def run_search(cfg: SearchConfig) -> int:
    from lmforge.rag.index import Index

    if not cfg.index:
        raise LmforgeError("say which index to search: --index DIR")
    if not cfg.query.strip():
        raise LmforgeError('give a question to search for: lmforge rag search --index DIR "your question"')
    index = Index.open(cfg.index)
    t0 = time.perf_counter()
    index.embedder  # noqa: B018  (load it before timing the search itself)
    t1 = time.perf_counter()
    hits = index.search(cfg.query, cfg.top_k)
    t2 = time.perf_counter()
    if cfg.json:
        print(json.dumps({"query": cfg.query, "index": cfg.index, "search_ms": round((t2 - t1) * 1000, 2),
                          "hits": [h.to_dict() for h in hits]}, ensure_ascii=False, indent=1))
        return 0
    for h in hits:
        where = f"{h.source}:{h.start}-{h.end}"
        if cfg.full:
            print(f"[{h.rank}] {h.score:.3f}  {where}\n{h.text}\n")
        else:
            snippet = " ".join(h.text.split())
            print(f"[{h.rank}] {h.score:.3f}  {where}\n    {snippet[:160]}{'...' if len(snippet) > 160 else ''}")
    if not hits:
        print("(the index is empty)")
    print(f"{len(hits)} hits from {len(index)} chunks; embedder load {t1 - t0:.1f}s, search {1000 * (t2 - t1):.1f} ms",
          file=sys.stderr)
    return 0
