#!/usr/bin/env bash
# Makes a Python environment with huggingface_hub (from PyPI), for the test
# that checks `mora-cache pull` and Python's own hub client read each other's
# caches (tests/pull.rs). Small (huggingface_hub and its few dependencies), so
# every test run has it; the benchmarks' peer (scripts/bench-python.sh) has it
# too.
#
#   scripts/python-hub.sh      # prints the interpreter's path on stdout
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.mora-test/hub-python"
PY="$VENV/bin/python"
if ! "$PY" -c "import huggingface_hub" 2>/dev/null; then
    echo "python-hub.sh: installing huggingface_hub into $VENV" >&2
    python3 -m venv "$VENV" >&2
    "$PY" -m pip --disable-pip-version-check --quiet install "huggingface_hub>=0.30" >&2
fi
echo "$PY"
