"""Evaluation: is the model any good, and better than the alternatives?

stats.py       Wilson score intervals for accuracies; McNemar's exact test and a paired bootstrap for differences
lm.py          a model directory opened for evaluation: prompt ids, log-likelihoods, greedy generation with timings
perplexity.py  `lmforge eval perplexity`: sliding-window perplexity over a text file or prepared validation shards
task.py        `lmforge eval task`: accuracy on JSONL examples (exact / contains / choice), few-shot, RAG
api.py         an OpenAI-compatible endpoint as a compare variant (chat completions; multiple choice by letter)
timing.py      how compare times variants: fixed threads, warm-up, interleaved passes, medians, load average
compare.py     `lmforge compare`: variants side by side on one task (accuracy + CI + paired tests against a
               baseline, latency, tokens, $ per 1k queries through plan.cost)
report.py      progress bars, plain-text tables, JSON results

External harnesses: lmforge checkpoints are HF directories, so lm-evaluation-harness runs on them as they are
(docs/eval.md has the command).
"""
