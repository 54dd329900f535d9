"""Data for training: corpus readers and the built-in stdlib corpus (corpus.py), token shards with their
manifest and the resumable loader (shards.py), SFT rendering with loss masks (sft.py), preference pairs
(preference.py), built-in SFT/preference sets (builtin_sets.py). Imports the tokenizer, never the model."""
