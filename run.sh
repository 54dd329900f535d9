#!/usr/bin/env bash
# The main job: the whole life of a model on the built-in corpus, about 10 minutes on 2 CPU cores.
# It is also the executable description of lmforge's workflow: every step is one `lmforge` command.
#
#   1. prepare   the Python standard library's own source -> a BPE tokenizer + token shards
#   2. pretrain  a ~5M-parameter Llama from scratch on it (600 steps, 1.2M tokens)
#   3. finetune  SFT, then DPO, on questions about the stdlib that its docstrings and signatures answer
#   4. compare   base vs few-shot vs SFT vs DPO on held-out questions: accuracy, latency, cost
#   5. generate  ask the finetuned model a question
#
# Re-running continues where it stopped: prepare reuses its shards and each training run resumes from its newest
# checkpoint. RUN=runs/other ./run.sh starts a separate run.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh

RUN="${RUN:-runs/demo}"
DATA="data/default"
mkdir -p "$RUN"

step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

step "1/5 prepare: tokenizer + token shards from the built-in corpus"
lmforge prepare --corpus default --out "$DATA"

step "2/5 pretrain: a tiny Llama from scratch"
lmforge pretrain --data "$DATA" --preset tiny --out "$RUN/pretrain" --max-steps 600

step "3/5 finetune: SFT on the built-in instruction set, then DPO on its preference pairs"
# token and step budgets (not wall-clock ones) keep the runs reproducible; each report scores held-out questions
lmforge finetune sft --base "$RUN/pretrain/final" --data builtin --out "$RUN/sft" \
  --max-tokens 500000 --pack --batch-size 8 --lr 2e-3 --eval-every 0
lmforge finetune dpo --base "$RUN/sft/final" --data builtin --out "$RUN/dpo" \
  --max-steps 100 --batch-size 8 --lr 2e-4 --eval-every 0

step "4/5 compare: which approach answers held-out questions best?"
HELDOUT="$RUN/sft/data/heldout-mc.jsonl"
lmforge compare --task "$HELDOUT" --metric choice --limit 200 \
  --variant base="$RUN/pretrain/final" \
  --variant fewshot="$RUN/pretrain/final",shots=3 \
  --variant sft="$RUN/sft/final" \
  --variant dpo="$RUN/dpo/final" \
  --out "$RUN/compare"

step "5/5 generate: ask the finetuned model"
lmforge generate --model "$RUN/dpo/final" --chat --temperature 0 --max-new-tokens 48 \
  --prompt "What does the function textwrap.dedent do?"

echo >&2
echo "done: reports in $RUN/*/report.md, the comparison in $RUN/compare/results.md" >&2
