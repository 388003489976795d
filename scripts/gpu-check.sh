#!/usr/bin/env bash
# Checks the CUDA path on a GPU machine and prints a report to paste into
# docs/gpu-results.md: correctness against the CPU, sharing across clients,
# the figures (CUDA context, IPC open, time to first result, loads against a
# plain read of the file and pinned host-to-device copies), and
# the Python package's torch CUDA tensors (when its wheel is in BIN_DIR).
#
# Usage: scripts/gpu-check.sh [BIN_DIR]    (default: target/cuda/dist, made
#        by scripts/build-cuda.sh on any machine and carried over)
# Environment:
#   MORA_TEST_HF_CACHE  HF cache holding all-MiniLM-L6-v2 (default .mora-test/hf-hub,
#                       made by scripts/fetch-test-model.sh)
#   DEVICE              device under test (default cuda:0; `cpu` runs the script's own
#                       logic on a machine without a GPU)
#   RUNS                repeats per figure, medians reported (default 5)
#   SYNTH_SIZES         synthetic bf16 BERT models to time too (default "1GB"; "" for none)
#   LOAD_SIZE           synthetic llamas (stored bf16 and f32) whose loads are timed against
#                       raw read and pinned host-to-device copies (default 2GiB; "" for none)
#   TORCH_PYTHON        python whose nvidia-* packages hold cuBLAS, cuRAND, NVRTC 13
#                       (default /opt/torch/.venv/bin/python3, else python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
BIN="$(cd "${1:-$ROOT/target/cuda/dist}" && pwd)"
DEVICE="${DEVICE:-cuda:0}"
RUNS="${RUNS:-5}"
SYNTH_SIZES="${SYNTH_SIZES-1GB}"
export HF_HUB_CACHE="${MORA_TEST_HF_CACHE:-$ROOT/.mora-test/hf-hub}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mora-gpu-check.XXXXXX")"
export MORA_SOCKET="$WORK/cache.sock"
log() { echo "gpu-check: $*" >&2; }
die() { echo "gpu-check: error: $*" >&2; exit 1; }

[[ -x "$BIN/mora-cache" && -x "$BIN/mora-exec" ]] || die "no mora-cache and mora-exec in $BIN (run scripts/build-cuda.sh)"
[[ -d "$HF_HUB_CACHE/models--sentence-transformers--all-MiniLM-L6-v2" ]] \
    || die "all-MiniLM-L6-v2 is not in $HF_HUB_CACHE (run scripts/fetch-test-model.sh, or set MORA_TEST_HF_CACHE)"
GPU=0
if [[ "$DEVICE" == cuda* ]]; then
    GPU=1
    command -v nvidia-smi >/dev/null || die "DEVICE=$DEVICE but nvidia-smi is missing: is this a GPU machine?"
    PY="${TORCH_PYTHON:-/opt/torch/.venv/bin/python3}"
    [[ -x "$PY" ]] || PY=python3
    # cuBLAS, cuRAND and NVRTC 13 from the nvidia-* wheels PyTorch brings.
    libs="$("$PY" - <<'PY' 2>/dev/null || true
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
dirs = {os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
PY
)"
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# -- helpers -----------------------------------------------------------------
now_ms() { date +%s%3N; }
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# field LABEL FILE: the number after LABEL in a mora-exec report line.
field() { sed -n "s/.*$1 \([0-9.]*\) ms.*/\1/p" "$2" | head -1; }
# run_once WORKFLOW OUT_DIR [ARGS...]: runs mora-exec, prints "wall_ms|device_ms|map_ms"
# (device_ms empty on the CPU, map_ms empty with --no-cache).
run_once() {
    local wf="$1" out="$2"; shift 2
    local t0 t1
    t0="$(now_ms)"
    "$BIN/mora-exec" run "$wf" -o "$out" "$@" >"$out.log" 2>&1 || { cat "$out.log" >&2; die "mora-exec run $wf failed"; }
    t1="$(now_ms)"
    echo "$((t1 - t0))|$(field 'device opened in' "$out.log")|$(field 'mapped in' "$out.log")"
}
# timed NAME WORKFLOW [ARGS...]: RUNS runs; sets NAME_wall, NAME_dev, NAME_map (medians).
timed() {
    local name="$1" wf="$2"; shift 2
    local rows="$WORK/$name.times"
    : >"$rows"
    for i in $(seq "$RUNS"); do run_once "$wf" "$WORK/out-$name-$i" "$@" >>"$rows"; done
    printf -v "${name}_wall" '%s' "$(cut -d'|' -f1 "$rows" | median)"
    printf -v "${name}_dev" '%s' "$(cut -d'|' -f2 "$rows" | grep . | median)"
    printf -v "${name}_map" '%s' "$(cut -d'|' -f3 "$rows" | grep . | median)"
}
max_abs_diff() {
    python3 - "$1" "$2" <<'PY'
import json, sys
a, b = (json.load(open(p))["embeddings"] for p in sys.argv[1:3])
assert len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b)), "shapes differ"
print(f"{max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)):.3g}")
PY
}
workflow() {  # workflow FILE MODEL_LINE DEVICE TEXTS_LINE
    cat >"$1" <<TOML
name = "gpu-check"
[models.m]
$2
device = "$3"
[[steps]]
name = "embed"
task = "embed"
model = "m"
$4
output = "embeddings.json"
TOML
}

# -- the machine -------------------------------------------------------------
echo "## GPU check, $(date -u +%Y-%m-%d)"
echo
if ((GPU)); then
    echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader -i 0)"
    echo "- driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader -i 0); CUDA (driver): $(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p')"
fi
echo "- binaries: $(for b in mora-cache mora-exec; do printf '%s %s MiB; ' "$b" "$(awk -v b="$(stat -c %s "$BIN/$b")" 'BEGIN { printf "%.1f", b / 1048576 }')"; done)device $DEVICE; $RUNS runs per figure, medians"
echo "- command: DEVICE=$DEVICE RUNS=$RUNS SYNTH_SIZES=\"$SYNTH_SIZES\" scripts/gpu-check.sh"
echo

# -- the daemon ----------------------------------------------------------------
"$BIN/mora-cache" serve --keep-alive -1 2>"$WORK/daemon.log" &
DAEMON=$!
EXTRA_PIDS=()
trap '"$BIN/mora-cache" stop >/dev/null 2>&1 || kill $DAEMON 2>/dev/null || true; kill ${EXTRA_PIDS[*]} 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 600); do [[ -S "$MORA_SOCKET" ]] && break; kill -0 $DAEMON 2>/dev/null || break; sleep 0.1; done
[[ -S "$MORA_SOCKET" ]] || { cat "$WORK/daemon.log" >&2; die "the daemon did not start"; }
if ((GPU)) && ! grep -q "serving GPU" "$WORK/daemon.log"; then
    cat "$WORK/daemon.log" >&2
    die "the daemon found no usable GPU"
fi

TEXTS='texts = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.", "A cheetah is running behind its prey.", "Two men pushed carts through the woods.", "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.", "Someone in a gorilla costume is playing a set of drums."]'
MINILM='repo = "sentence-transformers/all-MiniLM-L6-v2"'
workflow "$WORK/dev.toml" "$MINILM" "$DEVICE" "$TEXTS"
workflow "$WORK/cpu.toml" "$MINILM" cpu "$TEXTS"

# -- correctness ---------------------------------------------------------------
log "MiniLM: cold run, CPU reference"
IFS='|' read -r cold_wall cold_dev cold_map < <(run_once "$WORK/dev.toml" "$WORK/out-cold")
run_once "$WORK/cpu.toml" "$WORK/out-cpu" --no-cache >/dev/null
diff_cached="$(max_abs_diff "$WORK/out-cold/embeddings.json" "$WORK/out-cpu/embeddings.json")"
run_once "$WORK/dev.toml" "$WORK/out-nc" --no-cache >/dev/null
diff_nocache="$(max_abs_diff "$WORK/out-nc/embeddings.json" "$WORK/out-cpu/embeddings.json")"
ok() { python3 -c "import sys; print('PASS' if float(sys.argv[1]) <= 1e-4 else 'FAIL')" "$1"; }
echo "### Correctness"
echo
echo "- MiniLM on $DEVICE from the cache vs CPU: max |difference| per component $diff_cached: $(ok "$diff_cached") (limit 1e-4)"
echo "- MiniLM on $DEVICE with --no-cache vs CPU: $diff_nocache: $(ok "$diff_nocache")"

# -- sharing -----------------------------------------------------------------
log "4 clients at once"
python3 -c "
import random
random.seed(0)
words = 'a man woman is eating food bread riding horse playing drums the new movie cheetah running prey'.split()
for _ in range(4000): print(' '.join(random.choice(words) for _ in range(24)))" >"$WORK/many.txt"
workflow "$WORK/many.toml" "$MINILM" "$DEVICE" "texts_file = \"many.txt\""
smi_log="$WORK/smi.csv"
: >"$smi_log"
if ((GPU)); then
    ( while :; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits >>"$smi_log" 2>/dev/null; sleep 0.1; done ) &
    SAMPLER=$!
fi
pids=()
for i in 1 2 3 4; do
    "$BIN/mora-exec" run "$WORK/many.toml" -o "$WORK/out-many-$i" >"$WORK/many-$i.log" 2>&1 &
    pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
((GPU)) && kill "$SAMPLER" 2>/dev/null
same=yes
for i in 2 3 4; do cmp -s "$WORK/out-many-1/embeddings.json" "$WORK/out-many-$i/embeddings.json" || same=no; done
echo
echo "### Sharing: 4 clients at once ($(wc -l <"$WORK/many.txt") texts each)"
echo
echo "- clients failed: $failed; outputs identical: $same"
if ((GPU)); then
    client_pids=" ${pids[*]} "
    awk -F', *' -v d="$DAEMON" -v c="$client_pids" '
        $1 == d { if ($2 > dm) dm = $2 }
        index(c, " " $1 " ") { if ($2 > cm[$1]) cm[$1] = $2 }
        END {
            printf "- nvidia-smi, most memory seen per process: daemon %d MiB", dm
            n = 0; for (p in cm) { printf "; client %s %d MiB", p, cm[p]; n++ }
            printf " (%d of 4 clients seen)\n", n
        }' "$smi_log"
fi

# -- figures -----------------------------------------------------------------
log "MiniLM: $RUNS warm runs, $RUNS --no-cache runs"
timed mw "$WORK/dev.toml"
timed mn "$WORK/dev.toml" --no-cache
rows=("| all-MiniLM-L6-v2 f32 (86.6 MiB) | ${mw_dev:-n/a} | ${mw_map:-n/a} | $mw_wall | $mn_wall | $(awk -v a="$mw_wall" -v b="$mn_wall" 'BEGIN { printf "%.2fx", a / b }') |")
for size in $SYNTH_SIZES; do
    log "synthetic bf16 BERT of $size"
    dir="$WORK/synth-$size"
    "$BIN/mora-exec" synth --arch bert --size "$size" --dtype bf16 -o "$dir" >/dev/null
    workflow "$WORK/synth-$size.toml" "path = \"$dir\"
dtype = \"bf16\"" "$DEVICE" "$TEXTS"
    run_once "$WORK/synth-$size.toml" "$WORK/out-synth-$size-cold" >/dev/null
    timed sw "$WORK/synth-$size.toml"
    timed sn "$WORK/synth-$size.toml" --no-cache
    rows+=("| synthetic BERT bf16 ($size) | ${sw_dev:-n/a} | ${sw_map:-n/a} | $sw_wall | $sn_wall | $(awk -v a="$sw_wall" -v b="$sn_wall" 'BEGIN { printf "%.2fx", a / b }') |")
done
echo
echo "### Figures (ms, median of $RUNS; wall = process start to exit, results written)"
echo
echo "| model | device open (context) | IPC open + wrap | warm wall | --no-cache wall | warm / no-cache |"
echo "| --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
echo
echo "MiniLM cold run (the daemon loads it): wall $cold_wall ms, device open ${cold_dev:-n/a} ms, map ${cold_map:-n/a} ms."
echo
echo "### Daemon loads"
echo
sed -nE 's/.* resident model=([^ ]*) .*device=(cpu|cuda GPU-[^ ]*) mib=([0-9.]*) ms=([0-9]*) gb_per_s=([0-9.]*).*/- \1 on \2: \3 MiB in \4 ms, \5 GB\/s (read, converted, copied to the device)/p' "$WORK/daemon.log"

# -- loads against the machine's limits ------------------------------------------
# The daemon's load from disk to the device against the two things that bound
# it here: a plain read(2) of the same file (page cache dropped, or the file
# in it) and pinned host-to-device copies (torch). Two daemons of their own,
# one loading from every core (the default), one from one thread
# (MORA_LOAD_THREADS=1); each load goes into a cleared daemon and is timed by
# the daemon's own `ms=` figure.
LOAD_SIZE="${LOAD_SIZE-2GiB}"
if [[ -n "$LOAD_SIZE" ]]; then
    log "loads: synthetic llama of $LOAD_SIZE stored as bf16 and as f32, held as bf16"
    for stored in bf16 f32; do
        "$BIN/mora-exec" synth --arch llama --size "$LOAD_SIZE" --dtype "$stored" -o "$WORK/load-$stored" >/dev/null
    done
    sync
    # drop_cache FILE: the file out of the page cache (written back first).
    drop_cache() { python3 -c "import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)" "$1"; }
    # raw_read FILE: ms for read(2) of the whole file into a reused 16 MiB buffer.
    raw_read() {
        python3 - "$1" <<'PY'
import sys, time
buf = bytearray(16 << 20)
t0 = time.perf_counter()
with open(sys.argv[1], "rb", buffering=0) as f:
    while f.readinto(buf):
        pass
print(f"{(time.perf_counter() - t0) * 1000:.1f}")
PY
    }
    declare -A SOCK LOG
    # every, one: GPU loads from every core and from one thread; written,
    # mapped: host segments filled with pwrite or through a mapping.
    for kind in every one written mapped; do
        SOCK[$kind]="$WORK/load-$kind.sock"; LOG[$kind]="$WORK/load-$kind.log"
        threads=""; [[ $kind == one ]] && threads=1
        fill=""; [[ $kind == written || $kind == mapped ]] && fill="$kind"
        MORA_SOCKET="${SOCK[$kind]}" MORA_LOAD_THREADS="$threads" MORA_SEGMENT_FILL="$fill" "$BIN/mora-cache" serve --keep-alive -1 2>"${LOG[$kind]}" &
        EXTRA_PIDS+=($!)
        for _ in $(seq 600); do [[ -S "${SOCK[$kind]}" ]] && break; sleep 0.1; done
        [[ -S "${SOCK[$kind]}" ]] || { cat "${LOG[$kind]}" >&2; die "the load daemon ($kind) did not start"; }
    done
    # daemon_load KIND DIR [DTYPE DEVICE]: one load (default: held as bf16 on
    # $DEVICE) into the cleared daemon; prints its ms.
    daemon_load() {
        local before after
        before="$(grep -c ' resident model=' "${LOG[$1]}" || true)"
        MORA_SOCKET="${SOCK[$1]}" "$BIN/mora-cache" load "$2" --dtype "${3:-bf16}" --device "${4:-$DEVICE}" >/dev/null 2>"$WORK/load.err" \
            || { cat "$WORK/load.err" >&2; die "mora-cache load $2 failed"; }
        after="$(grep -c ' resident model=' "${LOG[$1]}" || true)"
        ((after > before)) || die "no load logged for $2"
        sed -nE 's/.* resident model=.* ms=([0-9]+) .*/\1/p' "${LOG[$1]}" | tail -1
        MORA_SOCKET="${SOCK[$1]}" "$BIN/mora-cache" clear >/dev/null || die "mora-cache clear failed"
    }
    # stats BYTES MS...: sets STATS to "median | min | max | GB/s" and GBS to the GB/s.
    stats() {
        local bytes="$1"; shift
        local med lo hi
        med="$(printf '%s\n' "$@" | median)"
        lo="$(printf '%s\n' "$@" | sort -g | head -1)"
        hi="$(printf '%s\n' "$@" | sort -g | tail -1)"
        GBS="$(awk -v b="$bytes" -v m="$med" 'BEGIN { printf "%.2f", b / m / 1e6 }')"
        STATS="$med | $lo | $hi | $GBS"
    }
    echo
    echo "### Loads against the machine's limits ($LOAD_SIZE synthetic llama, $RUNS runs each)"
    echo
    echo "Daemon loads held as bf16 on $DEVICE into a cleared daemon, timed by the daemon (\`ms=\` in its log); raw read: read(2) of the file into a 16 MiB buffer; H2D: torch copying 1 GiB from pinned host memory. GB/s is the file's bytes over the median time; the last column is against the lower of the raw read in the same cache state and H2D (goal ≥ 0.8x)."
    echo
    echo "| stored | page cache | contender | median ms | min | max | GB/s | vs limit |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
    h2d_gbs=0
    if ((GPU)); then
        h2d="$("$PY" - "$DEVICE" "$RUNS" <<'PY' || true
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
        if [[ -n "$h2d" ]]; then
            stats $((1 << 30)) $h2d
            h2d_gbs="$GBS"
            echo "| | | pinned host to device, 1 GiB (torch) | $STATS | 1 (H2D) |"
        else
            echo "| | | pinned host to device (torch) | failed, see above | | | | |"
        fi
    fi
    goal_rows=()
    for stored in bf16 f32; do
        file="$WORK/load-$stored/model.safetensors"
        bytes="$(stat -c %s "$file")"
        for state in dropped kept; do
            times=()
            for _ in $(seq "$RUNS"); do
                [[ $state == dropped ]] && drop_cache "$file"
                times+=("$(raw_read "$file")")
            done
            stats "$bytes" "${times[@]}"
            limit="$(awk -v r="$GBS" -v h="$h2d_gbs" 'BEGIN { print (h > 0 && h < r) ? h : r }')"
            echo "| $stored | $state | raw read | $STATS | 1 (read) |"
            for kind in one every; do
                times=()
                for _ in $(seq "$RUNS"); do
                    [[ $state == dropped ]] && drop_cache "$file"
                    times+=("$(daemon_load "$kind" "$WORK/load-$stored")")
                done
                stats "$bytes" "${times[@]}"
                ratio="$(awk -v g="$GBS" -v l="$limit" 'BEGIN { printf "%.2fx", g / l }')"
                if [[ $kind == one ]]; then
                    echo "| $stored | $state | daemon load, one thread | $STATS | $ratio |"
                else
                    echo "| $stored | $state | daemon load, every core | $STATS | $ratio |"
                    verdict="$(awk -v g="$GBS" -v l="$limit" 'BEGIN { print (g / l >= 0.8) ? "met" : "MISSED" }')"
                    goal_rows+=("- stored as $stored, held as bf16, page cache $state: $ratio of the limit ($limit GB/s): $verdict")
                fi
            done
        done
    done
    echo
    printf '%s\n' "${goal_rows[@]}"
    # The host fill under this machine's shared-memory setting, on its cores:
    # the daemon picks pwrite where shared memory gets no huge pages, which
    # was measured on 2 cores only (docs/decisions.md).
    file="$WORK/load-f32/model.safetensors"
    bytes="$(stat -c %s "$file")"
    echo
    echo "Host segments on this machine ($(nproc) CPUs, shared-memory huge pages: $(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null || echo unknown)), the f32 checkpoint held as f32 on the CPU, from every core:"
    echo
    echo "| page cache | fill | median ms | min | max | GB/s |"
    echo "| --- | --- | --- | --- | --- | --- |"
    for state in dropped kept; do
        for kind in written mapped; do
            times=()
            for _ in $(seq "$RUNS"); do
                [[ $state == dropped ]] && drop_cache "$file"
                times+=("$(daemon_load "$kind" "$WORK/load-f32" f32 cpu)")
            done
            stats "$bytes" "${times[@]}"
            echo "| $state | $kind | $STATS |"
        done
    done
    for kind in every one written mapped; do MORA_SOCKET="${SOCK[$kind]}" "$BIN/mora-cache" stop >/dev/null 2>&1 || true; done
fi

# -- the Python package on the GPU ----------------------------------------------
WHEEL="$(ls "$BIN"/mora-*.whl 2>/dev/null | head -1 || true)"
echo
echo "### Python package: torch CUDA tensors over the daemon's allocation"
echo
if ((GPU == 0)) || [[ -z "$WHEEL" ]] || ! "$PY" -c "import torch, safetensors" 2>/dev/null; then
    echo "- not run: needs DEVICE=cuda:N, the wheel in $BIN (scripts/build-cuda.sh) and torch + safetensors in $PY"
else
    log "Python package: state_dict on $DEVICE"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index --target "$WORK/pylib" "$WHEEL" >&2
    PYTHONPATH="$WORK/pylib" DEVICE="$DEVICE" "$PY" - <<'PY' || echo "- FAIL: the Python check raised (see above)"
import gc, os, time
import torch
from safetensors.torch import load_file
import mora

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
dev = os.environ["DEVICE"]
def leases(c):
    return sum(m["leases"] for m in c.ps() if m["device"] != "cpu")
client = mora.connect(autostart=False)
t0 = time.perf_counter()
sd = client.state_dict(MODEL, dtype=torch.float16, device=dev)
first = (time.perf_counter() - t0) * 1000
t0 = time.perf_counter()
sd2 = client.state_dict(MODEL, dtype=torch.float16, device=dev)
again = (time.perf_counter() - t0) * 1000
ref = {k: (v.half() if v.is_floating_point() else v).to(dev) for k, v in load_file(os.path.join(sd.dir, "model.safetensors")).items()}
same = all(torch.equal(sd[k], ref[k]) for k in ref) and set(sd) == set(ref)
on_gpu = all(t.is_cuda for t in sd.values())
print(f"- state_dict(dtype=float16, device={dev!r}): {first:.0f} ms (the daemon loaded it to the GPU), again {again:.1f} ms")
print(f"- every tensor on the GPU: {'PASS' if on_gpu else 'FAIL'}; equal to the file's weights as f16: {'PASS' if same else 'FAIL'}")
w = sd["encoder.layer.0.attention.self.query.weight"]
x = torch.randn(8, w.shape[1], device=dev, dtype=torch.float16)
y = x @ w.T
print(f"- a matmul on the lent weights: {'PASS' if torch.allclose(y.float(), (x.float() @ ref['encoder.layer.0.attention.self.query.weight'].float().T), atol=1e-2, rtol=1e-2) else 'FAIL'}")
del sd2          # its mapping closes and its lease ends
gc.collect()
client.close()
watch = mora.connect(autostart=False)
held = leases(watch)
del sd, w, y
gc.collect()
torch.cuda.synchronize()
time.sleep(0.2)
released = leases(watch)
print(f"- after close() with tensors alive, GPU leases: {held} (expected 1, the tensors hold it): {'PASS' if held == 1 else 'FAIL'}")
print(f"- after the tensors are gone, GPU leases: {released} (expected 0): {'PASS' if released == 0 else 'FAIL'}")
watch.close()
PY
fi

# -- images: Stable Diffusion on the GPU ----------------------------------------
echo
echo "### Images: a Stable Diffusion pipeline on $DEVICE (weights held f16) vs the CPU (f32)"
echo
# png_diff A B: the largest difference of one channel of one pixel between two PNGs
# (8-bit RGB, as mora-exec writes them), with the standard library alone.
png_diff() {
    python3 - "$1" "$2" <<'PY'
import struct, sys, zlib
def rgb(path):
    data = open(path, "rb").read()
    pos, w, h, idat = 8, 0, 0, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8]); body = data[pos + 8:pos + 8 + n]; pos += 12 + n
        if kind == b"IHDR": w, h = struct.unpack(">II", body[:8])
        elif kind == b"IDAT": idat += body
    raw, stride, out, prev = zlib.decompress(idat), w * 3, [], bytearray(w * 3)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - 3] if i >= 3 else 0; b = prev[i]; c = prev[i - 3] if i >= 3 else 0
            if f == 1: line[i] = (line[i] + a) & 255
            elif f == 2: line[i] = (line[i] + b) & 255
            elif f == 3: line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c; pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line; prev = line
    return out
a, b = rgb(sys.argv[1]), rgb(sys.argv[2])
print(max(abs(x - y) for x, y in zip(a, b)) if len(a) == len(b) else "size differs")
PY
}
img_rows=()
for shape in sd15 sd21 sdxl; do
    fixture="$ROOT/tests/fixtures/image/pipelines/$shape"
    for dev in "$DEVICE" cpu; do
        dtype=f16; [[ $dev == cpu ]] && dtype=f32
        cat >"$WORK/img-$shape-$dev.toml" <<TOML
name = "img"
[models.sd]
path = "$fixture"
device = "$dev"
dtype = "$dtype"
[[steps]]
name = "cat"
model = "sd"
task = "image"
prompt = "a photo of a cat, watercolor"
steps = 4
seed = 7
output = "cat.png"
TOML
        "$BIN/mora-exec" run "$WORK/img-$shape-$dev.toml" -o "$WORK/img-$shape-$dev" >/dev/null 2>"$WORK/img-$shape-$dev.err" \
            || { echo "- FAIL: $shape on $dev: $(tail -1 "$WORK/img-$shape-$dev.err")"; continue 2; }
    done
    img_rows+=("- $shape (diffusers-written tiny pipeline, 4 steps): largest pixel difference $DEVICE f16 vs cpu f32: $(png_diff "$WORK/img-$shape-$DEVICE/cat.png" "$WORK/img-$shape-cpu/cat.png") of 255")
done
printf '%s\n' "${img_rows[@]}"
IMG_SIZE="${IMG_SIZE:-1900MiB}"
log "synthetic SD 1.5 pipeline of $IMG_SIZE (f16)"
"$BIN/mora-exec" synth --arch sd15 --size "$IMG_SIZE" --dtype f16 -o "$WORK/sd15-synth" >/dev/null
cat >"$WORK/img-synth.toml" <<TOML
name = "img"
[models.sd]
path = "$WORK/sd15-synth"
device = "$DEVICE"
dtype = "f16"
[[steps]]
name = "cat"
model = "sd"
task = "image"
prompt = "a photo of a cat, watercolor"
steps = 20
width = 512
height = 512
seed = 7
output = "cat.png"
TOML
run_once "$WORK/img-synth.toml" "$WORK/img-synth-cold" >/dev/null
timed iw "$WORK/img-synth.toml"
timed inc "$WORK/img-synth.toml" --no-cache
echo "- synthetic SD 1.5 shapes ($IMG_SIZE f16), 20 steps at 512x512 on $DEVICE: warm wall $iw_wall ms, --no-cache wall $inc_wall ms ($(awk -v a="$iw_wall" -v b="$inc_wall" 'BEGIN { printf "%.2fx", a / b }'))"
