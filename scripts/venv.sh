#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install lmforge into it.
# torch goes first, pinned to the CPU build, so no dependency can pull a multi-GB CUDA wheel.
# Sourced by run.sh and test.sh; re-installs only when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LMFORGE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.lmforge-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "installing lmforge and its dependencies into $VENV" >&2
  quiet() { grep -v "is neither a file nor a directory" || true; }  # noise from this machine's pip config
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | quiet
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test,rag]" 2>&1 | quiet
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
