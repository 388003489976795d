#!/usr/bin/env bash
# Installs the Python package (python/) and what its tests need (numpy,
# pytest, safetensors, all from PyPI) into a Python environment, with the one
# `pip install ./python` a user runs (maturin builds the extension; a dev
# build here, sharing target/ with the workspace).
#
#   scripts/python-env.sh             # the test venv, .mora-test/python (created if missing)
#   scripts/python-env.sh PYTHON      # the environment of that interpreter (e.g. the bench peer's)
#
# Prints the interpreter's path on stdout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -ge 1 ]]; then
    PY="$1"
else
    VENV="$ROOT/.mora-test/python"
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "python-env.sh: creating $VENV" >&2
        python3 -m venv "$VENV" >&2
    fi
    PY="$VENV/bin/python"
fi
PIP=("$PY" -m pip --disable-pip-version-check --quiet)
if ! "$PY" -c "import numpy, pytest, safetensors" 2>/dev/null; then
    echo "python-env.sh: installing numpy, pytest, safetensors from PyPI" >&2
    "${PIP[@]}" install "numpy>=1.22" "pytest>=7" "safetensors>=0.4" >&2
fi
echo "python-env.sh: pip install ./python (maturin, dev profile)" >&2
# Build isolation fetches maturin from PyPI, as for any user.
(cd "$ROOT" && MATURIN_PEP517_ARGS="--profile dev" "${PIP[@]}" install --force-reinstall --no-deps ./python >&2)
echo "$PY"
