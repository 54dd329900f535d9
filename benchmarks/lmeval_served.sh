#!/usr/bin/env bash
# lm-evaluation-harness on a real model, two ways: `--model hf` on the model directory and `--model
# local-completions` against `lmforge serve` on loopback; the accuracies and per-item log-likelihoods should agree.
#
#   ./run.sh && bash benchmarks/lmeval_served.sh        # SmolLM2-135M-Instruct and 30 held-out stdlib questions
#   MODEL=DIR ITEMS=file.jsonl N=100 bash benchmarks/lmeval_served.sh
#
# ITEMS: JSONL of {"question", "choices", "answer"} (./run.sh writes runs/demo/decision/data/heldout-mc.jsonl).
# Needs the test extra (lm-eval); nothing leaves 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-runs/demo/decision/base}"
ITEMS="${ITEMS:-runs/demo/decision/data/heldout-mc.jsonl}"
N="${N:-30}"
PORT="${PORT:-18537}"
PY="${PY:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W="$(mktemp -d)"
trap 'kill "${SPID:-}" 2>/dev/null || true; rm -rf "$W"' EXIT
mkdir -p "$W/tasks"
head -n "$N" "$ITEMS" > "$W/items.jsonl"
cat > "$W/tasks/served_mc.yaml" <<YAML
task: served_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: $W/items.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\nAnswer:"
doc_to_target: "{{answer}}"
doc_to_choice: "{{choices}}"
metric_list:
  - metric: acc
YAML
"$PY" -m lmforge.cli serve --model "m=$MODEL" --port "$PORT" --no-compile > "$W/serve.log" 2>&1 &
SPID=$!
for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.5; done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" -m lm_eval --model local-completions --model_args "model=m,base_url=http://127.0.0.1:$PORT/v1/completions,max_retries=1" \
  --tasks served_mc --include_path "$W/tasks" --output_path "$W/api" --log_samples 2>&1 | grep "served_mc|" || true
"$PY" -m lm_eval --model hf --model_args "pretrained=$MODEL,dtype=float32" --device cpu \
  --tasks served_mc --include_path "$W/tasks" --output_path "$W/hf" --log_samples 2>&1 | grep "served_mc|" || true
"$PY" - "$W" <<'PY'
import glob, json, sys
def loglik(d):
    (p,) = glob.glob(f"{sys.argv[1]}/{d}/*/samples_served_mc_*.jsonl")
    return {r["doc_id"]: [float(x[0]) for x in r["filtered_resps"]] for r in map(json.loads, open(p))}
a, b = loglik("api"), loglik("hf")
diff = max(abs(x - y) for k in a for x, y in zip(a[k], b[k]))
same = sum(a[k].index(max(a[k])) == b[k].index(max(b[k])) for k in a)
print(f"{len(a)} items: served vs hf, max |log-likelihood difference| {diff:.2g}, same choice on {same}/{len(a)}")
PY
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
