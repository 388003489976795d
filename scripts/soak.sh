#!/usr/bin/env bash
# A long soak: N sequential runs of examples/embed.toml against one daemon,
# printing the daemon's descriptor count, RSS, open leases, loads and hits
# before and after (docs/reliability.md records a run).
#
# Usage: N=1000 scripts/soak.sh [BIN_DIR]   (default target/debug; build first)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="${1:-target/debug}"
N="${N:-1000}"
HF_HUB_CACHE="$(scripts/fetch-test-model.sh)"
export HF_HUB_CACHE
WORK="$(mktemp -d)"
chmod 700 "$WORK"
export MORA_SOCKET="$WORK/cache.sock"
"$BIN/mora-cache" serve 2>"$WORK/daemon.log" &
DAEMON=$!
trap '"$BIN/mora-cache" stop >/dev/null 2>&1 || kill $DAEMON; rm -rf "$WORK"' EXIT
for _ in $(seq 200); do [[ -S "$MORA_SOCKET" ]] && break; sleep 0.05; done
"$BIN/mora-exec" run examples/embed.toml -o "$WORK/out" >/dev/null 2>&1
state() {
    echo "fds $(ls /proc/$DAEMON/fd | wc -l), RSS $(awk '/VmRSS/ { print $2 }' /proc/$DAEMON/status) KiB, $("$BIN/mora-cache" ps --json |
        python3 -c "import json, sys; m = json.load(sys.stdin); print('leases %d, loads %d, hits %d' % tuple(sum(x[k] for x in m) for k in ('leases', 'loads', 'hits')))")"
}
echo "soak: before: $(state)"
start=$(date +%s)
for i in $(seq "$N"); do
    "$BIN/mora-exec" run examples/embed.toml -o "$WORK/out" >/dev/null 2>"$WORK/last.err" || { cat "$WORK/last.err" >&2; echo "soak: run $i failed" >&2; exit 1; }
done
echo "soak: after $N runs in $(( $(date +%s) - start )) s: $(state)"
