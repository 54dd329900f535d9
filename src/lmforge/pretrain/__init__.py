"""Stage 1, pretraining from scratch: prepare.py (corpus -> tokenizer -> token shards) and train.py (one
readable training loop over the shards). Both are recipes: a Config dataclass and run(cfg)."""
