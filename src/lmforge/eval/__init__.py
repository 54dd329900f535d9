"""Evaluation: is the model any good, and better than the alternatives?

stats.py       Wilson score intervals for accuracies
lm.py          a model directory opened for evaluation: prompt ids, log-likelihoods, greedy generation with timings
perplexity.py  `lmforge eval perplexity`: sliding-window perplexity over a text file or prepared validation shards
task.py        `lmforge eval task`: accuracy on JSONL examples (exact / contains / choice), few-shot, RAG
compare.py     `lmforge compare`: variants side by side on one task (accuracy + CI, latency, tokens, $ per 1k queries)
report.py      progress bars, plain-text tables, JSON results

External harnesses: lmforge checkpoints are HF directories, so lm-evaluation-harness runs on them as they are
(docs/eval.md has the command).
"""
