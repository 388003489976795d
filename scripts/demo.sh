#!/usr/bin/env bash
# Builds Mora and shows the CPU path end to end: a daemon, a cold run, a warm
# run, the resident model, and the in-process baseline giving the same output.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

HF_HUB_CACHE="$(scripts/fetch-test-model.sh)"   # all-MiniLM-L6-v2 as an HF cache
export HF_HUB_CACHE
export MORA_SOCKET="${MORA_SOCKET:-$PWD/.mora-test/demo/cache.sock}"
cargo build --locked --workspace --bins
BIN=target/debug

"$BIN/mora-cache" stop >/dev/null 2>&1 || true
"$BIN/mora-cache" serve 2>.mora-test/demo.log &
trap '"$BIN/mora-cache" stop' EXIT
for _ in $(seq 100); do [[ -S "$MORA_SOCKET" ]] && break; sleep 0.05; done

echo "== cold run: the daemon loads the model"
"$BIN/mora-exec" run examples/embed.toml -o outputs/cached
echo "== warm run: a fresh process, weights from the daemon"
"$BIN/mora-exec" run examples/embed.toml -o outputs/cached
echo "== resident models"
"$BIN/mora-cache" ps
echo "== baseline: weights read in-process"
"$BIN/mora-exec" run examples/embed.toml --no-cache -o outputs/baseline
cmp outputs/cached/embeddings.json outputs/baseline/embeddings.json \
    && echo "== cached and --no-cache outputs are identical (outputs/*/embeddings.json)"
