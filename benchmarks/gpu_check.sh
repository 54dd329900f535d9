#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): pretrain a ~120M Llama, LoRA SFT, decode against the HBM bound, the server
# at 1/16/64 streams; one table at the end, in under ten minutes on one modern GPU. Exit 1 if a stage failed.
#
#   bash benchmarks/gpu_check.sh                      # on a CUDA machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-smoke          # toy sizes on CPU: the plumbing only
#   bash benchmarks/gpu_check.sh --json gpu.json --keep --work /tmp/gpu-check
#
# Needs lmforge installed with a CUDA torch (pip install -e '.[test]'), or PYTHON=/path/to/venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" >&2
exec timeout "${GPU_CHECK_TIMEOUT:-900}" "$PYTHON" benchmarks/gpu_check.py "$@"
