"""`lmforge chat [--rag INDEX]`: the terminal chat, with answers grounded in a RAG index when one is named.

The REPL itself is inference/chat.py; this module only adds retrieval on top (rag sits above inference, so the
hook is passed down as a callable). Sources are put into the newest user turn within the context budget and
printed as citations after each reply.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import opt
from lmforge.inference.chat import ChatConfig
from lmforge.inference.chat import run as run_chat


@dataclass
class RagChatConfig(ChatConfig):
    rag: str | None = opt(None, "RAG index directory (from `lmforge rag index`): answers cite retrieved sources")
    # not `top_k`: that name is the sampling section's --top-k (a RAG field of that name once shadowed it)
    rag_top_k: int = opt(4, "chunks retrieved per question (with --rag)")


def make_augment(index_dir: str, tokenizer, top_k: int):
    """The retrieval hook the REPL and the server call: (messages, budget) -> (messages, sources).

    tokenizer: the generator's (prompt budgets are counted in its tokens, its chat template included)."""
    from lmforge.rag.index import Index
    from lmforge.rag.prompt import augment_messages

    index = Index.open(index_dir)

    def augment(messages: list[dict], budget: int) -> tuple[list[dict], list[dict]]:
        return augment_messages(index, messages, tokenizer, budget=budget, top_k=top_k)

    return augment


def run(cfg: RagChatConfig) -> int:
    augment = None
    if cfg.rag:
        from lmforge.inference.load import resolve_model
        from lmforge.tokenizer import Tokenizer

        augment = make_augment(cfg.rag, Tokenizer.load(resolve_model(cfg.model, cfg.dtype)), cfg.rag_top_k)
    return run_chat(cfg, augment=augment)
