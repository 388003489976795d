#!/usr/bin/env bash
# Step `loads`: the daemon's load from disk to $DEVICE against the two things
# that bound it: a plain read(2) of the same file (page cache dropped, or the
# file in it) and pinned host-to-device copies (torch). Daemons of its own, one
# loading from every core (the default), one from one thread
# (MORA_LOAD_THREADS=1); each load goes into a cleared daemon and is timed by
# the daemon's own `ms`. Then host segments filled with pwrite and through a
# mapping on this machine's cores.
# shellcheck source=scripts/gpu/lib.sh
source "$GPU_DIR/lib.sh"

[[ -n $LOAD_SIZE ]] || skip_step "LOAD_SIZE is empty"
log "synthetic llamas of $LOAD_SIZE stored as bf16 and as f32, held as bf16"
for stored in bf16 f32; do
    model "load-$stored" llama "$LOAD_SIZE" "$stored" >/dev/null || exit 1
done
sync
# drop_cache FILE: the file out of the page cache (written back first).
drop_cache() { "$HOSTPY" -c "import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)" "$1"; }
# raw_read FILE: ms for read(2) of the whole file into a reused 16 MiB buffer.
raw_read() {
    "$HOSTPY" - "$1" <<'PY'
import sys, time
buf = bytearray(16 << 20)
t0 = time.perf_counter()
with open(sys.argv[1], "rb", buffering=0) as f:
    while f.readinto(buf):
        pass
print(f"{(time.perf_counter() - t0) * 1000:.1f}")
PY
}
# every, one: device loads from every core and from one thread; written,
# mapped: host segments filled with pwrite or through a mapping.
daemon_start every
daemon_start one MORA_LOAD_THREADS=1
daemon_start written MORA_SEGMENT_FILL=written
daemon_start mapped MORA_SEGMENT_FILL=mapped
# daemon_load KIND DIR [DTYPE DEVICE]: one load (default: held as bf16 on
# $DEVICE) into the cleared daemon; prints its ms.
daemon_load() {
    local sock="$STEP_DIR/$1.sock" logf="$STEP_DIR/$1.log" before after
    before="$(loads_logged "$logf" | wc -l)"
    MORA_SOCKET="$sock" "$BIN/mora-cache" load "$2" --dtype "${3:-bf16}" --device "${4:-$DEVICE}" >/dev/null 2>"$STEP_DIR/load.err" \
        || die "mora-cache load $2 failed: $(tail -1 "$STEP_DIR/load.err")"
    after="$(loads_logged "$logf" | wc -l)"
    ((after > before)) || die "no load logged for $2"
    loads_logged "$logf" | tail -1 | awk '{ print $2 }'
    MORA_SOCKET="$sock" "$BIN/mora-cache" clear >/dev/null || die "mora-cache clear failed"
}
# stats BYTES MS...: sets STATS to "median | min | max | GB/s" and GBS to the GB/s.
stats() {
    local bytes="$1"; shift
    local med lo hi
    med="$(printf '%s\n' "$@" | median)"
    lo="$(printf '%s\n' "$@" | sort -g | head -1)"
    hi="$(printf '%s\n' "$@" | sort -g | tail -1)"
    GBS="$(awk -v b="$bytes" -v m="$med" 'BEGIN { if (m > 0) printf "%.2f", b / m / 1e6; else print "n/a" }')"
    STATS="$med | $lo | $hi | $GBS"
}
md "Daemon loads held as bf16 on $DEVICE into a cleared daemon, timed by the daemon (\`ms\` in its log); raw read: read(2) of the file into a 16 MiB buffer; H2D: torch copying 1 GiB from pinned host memory. GB/s is the file's bytes over the median time; the last column is against the lower of the raw read in the same cache state and H2D (goal ≥ 0.8x). $RUNS runs each, $LOAD_SIZE synthetic llamas."
md "" "| stored | page cache | contender | median ms | min | max | GB/s | vs limit |" "| --- | --- | --- | --- | --- | --- | --- | --- |"
h2d_gbs=0
if ((GPU)); then
    if why="$(torch_ok)"; then
        h2d="$("$PY" - "$DEVICE" "$RUNS" <<'PY' 2>"$STEP_DIR/h2d.err"
import sys, time, torch
dev, runs = sys.argv[1], int(sys.argv[2])
src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
dst = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
dst.copy_(src, non_blocking=True); torch.cuda.synchronize()
for _ in range(runs):
    t0 = time.perf_counter(); dst.copy_(src, non_blocking=True); torch.cuda.synchronize()
    print(f"{(time.perf_counter() - t0) * 1000:.2f}")
PY
)"
        if [[ -n $h2d ]]; then
            # shellcheck disable=SC2086
            stats $((1 << 30)) $h2d
            h2d_gbs="$GBS"
            md "| | | pinned host to device, 1 GiB (torch) | $STATS | 1 (H2D) |"
            figure "pinned H2D" "$GBS" GB/s "torch, 1 GiB"
        else
            check "pinned H2D" fail "torch's copy failed: $(tail -1 "$STEP_DIR/h2d.err")"
        fi
    else
        check "pinned H2D" skip "skipped: $why"
    fi
else
    needs_gpu "pinned H2D" "torch's pinned host-to-device copies"
fi
for stored in bf16 f32; do
    file="$MODELS/load-$stored/model.safetensors"
    bytes="$(stat -c %s "$file")"
    for state in dropped kept; do
        times=()
        for _ in $(seq "$RUNS"); do
            [[ $state == dropped ]] && drop_cache "$file"
            times+=("$(raw_read "$file")")
        done
        stats "$bytes" "${times[@]}"
        limit="$(awk -v r="$GBS" -v h="$h2d_gbs" 'BEGIN { print (h > 0 && h < r) ? h : r }')"
        md "| $stored | $state | raw read | $STATS | 1 (read) |"
        figure "raw read, $stored, cache $state" "$GBS" GB/s ""
        for kind in one every; do
            times=()
            for _ in $(seq "$RUNS"); do
                [[ $state == dropped ]] && drop_cache "$file"
                times+=("$(daemon_load "$kind" "$MODELS/load-$stored")") || exit 1
            done
            stats "$bytes" "${times[@]}"
            r="$(ratio "$GBS" "$limit")"
            if [[ $kind == one ]]; then
                md "| $stored | $state | daemon load, one thread | $STATS | ${r}x |"
                figure "daemon load one thread, $stored, cache $state" "$GBS" GB/s "${r}x the limit"
            else
                md "| $stored | $state | daemon load, every core | $STATS | ${r}x |"
                figure "daemon load every core, $stored, cache $state" "$GBS" GB/s "${r}x the limit"
                if ((GPU)); then
                    check "load $stored, cache $state, ≥ 0.8x the limit" "$(pass_if "$r" '>=' 0.8)" "${r}x of $limit GB/s"
                fi
            fi
        done
    done
done
((GPU)) || needs_gpu "loads ≥ 0.8x the limit" "the goal is for loads to the device; the CPU rehearsal only times them"
# The host fill under this machine's shared-memory setting, on its cores.
file="$MODELS/load-f32/model.safetensors"
bytes="$(stat -c %s "$file")"
md "" "Host segments on this machine ($(nproc) CPUs, shared-memory huge pages: $(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null || echo unknown)), the f32 checkpoint held as f32 on the CPU, from every core:"
md "" "| page cache | fill | median ms | min | max | GB/s |" "| --- | --- | --- | --- | --- | --- |"
for state in dropped kept; do
    for kind in written mapped; do
        times=()
        for _ in $(seq "$RUNS"); do
            [[ $state == dropped ]] && drop_cache "$file"
            times+=("$(daemon_load "$kind" "$MODELS/load-f32" f32 cpu)") || exit 1
        done
        stats "$bytes" "${times[@]}"
        md "| $state | $kind | $STATS |"
        figure "host fill $kind, cache $state" "$GBS" GB/s ""
    done
done
