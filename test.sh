#!/usr/bin/env bash
# Run the test suite in the project's own virtual environment (created on first use).
# Extra arguments go to pytest, e.g. ./test.sh tests/model -k parity
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
set +e
python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collects nothing (e.g. a -k that matches no test): that is not a failure of the code.
if [ "$rc" -eq 5 ]; then echo "no tests collected" >&2; exit 0; fi
exit "$rc"
