"""Tokenizers: byte-level BPE training (bpe.py), the HF tokenizer.json/tokenizer_config.json Tokenizer
(tokenizer.py) and chat templates rendered as transformers renders them (chat.py). Imports no torch and no model."""

from lmforge.tokenizer.bpe import train_bpe
from lmforge.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer", "train_bpe"]
