#!/usr/bin/env bash
# Runs the benchmark harness (benches/mora.rs, src/bench/) on release builds
# and writes docs/benchmarks.md and docs/benchmarks.png. Takes about half an
# hour on 2 cores and needs about 12 GiB of memory free and 6 GiB of disk for
# the synthetic models (kept in .mora-bench/models for the next run).
#
# Usage: scripts/bench.sh [OPTIONS]        (scripts/bench.sh --help lists them)
#   scripts/bench.sh --scenarios 1,3       some scenarios only
#   scripts/bench.sh --smoke               every scenario on tiny models, in a minute
# The Python peer of scenario 1 is optional: scripts/bench-python.sh installs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/system-packages.sh
MORA_TEST_HF_CACHE="$(scripts/fetch-test-model.sh)"
export MORA_TEST_HF_CACHE
cargo build --locked --release --workspace --bins
exec cargo bench --locked --bench mora -- "$@"
