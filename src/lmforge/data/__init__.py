"""Data for training: corpus readers and the built-in stdlib corpus (corpus.py), token shards with their
manifest, the resumable loader and validation windows (shards.py), SFT rendering with loss masks (sft.py),
preference pairs (preference.py), built-in SFT/preference sets (builtin_sets.py), the held-out share of a record
set (split.py). Imports the tokenizer, never the model.

IGNORE_INDEX is the target id of a position that adds nothing to the loss, in every batch data/ makes (untrained
SFT tokens, a rank's padding windows). It is torch's cross-entropy default, and training/step.py's losses skip it.
"""

IGNORE_INDEX = -100
