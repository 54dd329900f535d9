"""Train a byte-level BPE tokenizer (the GPT-2 / Llama-3 family of tokenizers) with the `tokenizers` library.

Decisions, and why:
- Byte level: text is split into pieces, each piece's UTF-8 bytes are mapped to 256 printable stand-in characters,
  and BPE merges those. All 256 bytes are in the vocabulary from the start (ByteLevel.alphabet()), so every string
  (emoji, CJK, combining marks, control characters, invalid surrogate-free Unicode of any kind) encodes and decodes
  back exactly; there is no unknown token and no normalizer (NFC would change combining marks).
- Pieces follow the Llama-3 / cl100k split: contractions, letter runs with one leading non-letter, numbers in
  groups of at most three digits, punctuation runs, newlines and spaces apart. No prefix space is added.
- Special tokens take the first ids, in this order: <|begin_of_text|> (BOS) <|end_of_text|> (EOS) <|pad|> (PAD)
  <|im_start|> <|im_end|> (ChatML roles). There is no post-processor: encode() never adds BOS by itself; the data
  pipeline places bos_id/eos_id where documents start and end.
- `vocab_size` counts everything (specials + 256 bytes + merges). A corpus too small to support that many merges
  yields a smaller vocabulary; Tokenizer.vocab_size reports the real size.
The chat format (ChatML, chat.DEFAULT_CHAT_TEMPLATE) is attached here; tokenizer.py saves and loads the result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.errors import LmforgeError
from lmforge.tokenizer.chat import DEFAULT_CHAT_TEMPLATE
from lmforge.tokenizer.tokenizer import Tokenizer

BOS, EOS, PAD, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)

# One alternative per kind of piece (the split Llama 3 and cl100k use): English contractions; a letter run with at
# most one leading non-letter, non-digit (so " word" and "(word" stay whole); 1-3 digits; a punctuation run with an
# optional leading space and trailing newlines; newlines with the spaces before them; spaces not followed by text
# (so the last space attaches to the next word); any remaining whitespace.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
_BLOCK_CHARS = 1 << 20  # file text goes to the trainer in ~1M-character blocks cut at line ends


def file_texts(path: Path) -> Iterator[str]:
    """The text of one file: plain UTF-8 text, or the "text" field of each line of a .jsonl file."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise LmforgeError(f"{path}:{n} is not valid JSON ({e.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise LmforgeError(f"{path}:{n} has no string \"text\" field; .jsonl files for tokenizer "
                                           "training need one {\"text\": ...} object per line")
                    yield record["text"]
                return
            carry = ""
            while block := f.read(_BLOCK_CHARS):
                block = carry + block
                cut = block.rfind("\n") + 1  # keep the unfinished last line for the next block
                if cut == 0:
                    carry = block
                    continue
                carry = block[cut:]
                yield block[:cut]
            if carry:
                yield carry
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text (bad byte at offset {e.start} of a block); "
                           "convert it to UTF-8 first") from None
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None


def _texts(source: Iterable[str] | list[str | os.PathLike]) -> Iterator[str]:
    """Strings from a list of file paths or from an iterable of strings."""
    if isinstance(source, (list, tuple)) and all(isinstance(s, (str, os.PathLike)) for s in source):
        paths = [Path(s) for s in source]
        for p in paths:
            try:
                ok = p.is_file()
            except OSError:  # e.g. "file name too long": a text passed where a path was expected
                ok = False
            if not ok:
                shown = str(p) if len(str(p)) < 80 else str(p)[:60] + "..."
                raise LmforgeError(f"training file {shown!r} does not exist; a list given to train_bpe holds file "
                                   "paths (to train on strings, pass an iterator such as iter(texts))")
        for p in paths:
            yield from file_texts(p)
        return
    for i, text in enumerate(source):
        if not isinstance(text, str):
            raise LmforgeError(f"train_bpe got a {type(text).__name__} as text item {i}; give strings or file paths")
        yield text


def new_backend() -> tokenizers.Tokenizer:
    """An untrained byte-level BPE pipeline: Llama-3 split, byte mapping, byte-level decoder, no post-processor."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def train_bpe(files: Iterable[str] | list[str | os.PathLike], vocab_size: int, *, min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most `vocab_size` ids on text files or an iterable of strings.

    `files` is a list of paths (UTF-8 text; .jsonl files give their lines' "text" fields) or any iterable of
    strings (e.g. a generator over a corpus). Returns a Tokenizer with BOS/EOS/PAD, ChatML role tokens and the
    ChatML default chat template.
    """
    if isinstance(files, (str, os.PathLike)):
        if not Path(files).is_file():
            raise LmforgeError("train_bpe takes a list of file paths or an iterable of strings, not a single string")
        files = [files]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise LmforgeError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise LmforgeError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
                           f"ids (256 bytes + {len(SPECIAL_TOKENS)} special tokens); use thousands, e.g. 8192")
    if min_frequency < 1:
        raise LmforgeError("min_frequency must be at least 1")
    backend = new_backend()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = [0]  # 1 once any non-blank text reached the trainer

    def counted() -> Iterator[str]:
        for text in _texts(files):
            if not seen[0] and text.strip():
                seen[0] = 1
            yield text

    backend.train_from_iterator(counted(), trainer)
    if not seen[0]:
        raise LmforgeError("no text to train the tokenizer on: the files (or strings) given are empty or blank")
    return Tokenizer(backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=DEFAULT_CHAT_TEMPLATE)
