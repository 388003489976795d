#!/usr/bin/env bash
# Checks the CUDA path on a GPU machine in one command and writes the report
# docs/gpu-results.md takes: what the machine is, correctness against the
# CPU, generation, faults (clients and the daemon killed), attaching a model
# of 14 GiB, sharing, warm runs against --no-cache, the PyTorch peers
# (sentence-transformers, transformers, diffusers) on the device, the Python
# package's CUDA tensors, image pipelines, and loads against the machine's
# limits. Every model is made on the machine (`mora-exec synth`).
#
# Each step runs in a process of its own under a timeout, with daemons of its
# own; a step that fails is recorded with its error and the next one runs. A
# step that needs what this machine lacks says "skipped" and why. The run
# stops starting steps when its budget is spent.
#
# Usage: scripts/gpu-check.sh [BIN_DIR]    (default: target/cuda/dist, made by
#        scripts/build-cuda.sh; the bundle of scripts/gpu-bundle.sh runs it for you)
# Environment:
#   DEVICE        device under test (default cuda:0; `cpu` rehearses every step's
#                 logic on a machine without a GPU, as scripts/test.sh does)
#   RUNS          repeats per figure, medians reported (default 3)
#   BUDGET        seconds for the whole run (default 480); STEP_TIMEOUT_SCALE
#                 multiplies every step's own timeout (default 1)
#   STEPS, SKIP   which steps to run (default: all, in this order):
#                 machine correctness generate faults attach sharing figures
#                 peers-text images peers-image python loads
#   REQUIRE       steps that must pass (default: none); any other failure
#                 fails the run too, a skip does not
#   OUT           when set, the report (gpu-results.md), gpu-check.json and each
#                 step's log are written under it; the report goes to stdout always
#   EMBED_SIZE    bytes of the synthetic f32 BERT the embedding steps use (default
#                 43570176: all-MiniLM-L6-v2's shape, hidden 384, 6 layers, with
#                 synth's small vocabulary); EMBED_MODEL=REPO_OR_DIR uses a real one
#   GEN_SIZE      synthetic llama of the generate step (default 256MiB, bf16)
#   GEN_TOKENS    tokens per run for the tokens/s figures (default 128)
#   ATTACH_SIZE   synthetic llama attached by 4 clients (default 14GiB bf16; made
#                 in the background from the start of the run)
#   FAULT_CLIENTS clients killed with SIGKILL (default 50), FAULT_PARALLEL at a time (8)
#   SHARE_TEXTS   texts each of the 4 sharing clients embeds (default 4000)
#   SYNTH_SIZES   synthetic bf16 BERTs timed warm and --no-cache (default "1GB")
#   IMG_SIZE      synthetic SD 1.5 pipeline, f16 (default 1900MiB); IMG_STEPS,
#                 IMG_WIDTH, IMG_HEIGHT (default 20, 512, 512)
#   LOAD_SIZE     synthetic llamas (bf16 and f32) whose loads are timed against a
#                 raw read and pinned host-to-device copies (default 2GiB; "" for none)
#   TORCH_PYTHON  python with torch and the peers (default /opt/torch/.venv/bin/python3,
#                 else python3); WHEELS: folder of wheels (mora, diffusers) to
#                 install offline (default BIN_DIR/../wheels, else BIN_DIR)
#   WORK_DIR      where models and scratch go (default $TMPDIR or /tmp; about 25 GiB)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
START_S="$(date +%s)"
fatal() { echo "gpu-check: error: $*" >&2; exit 2; }
BIN="$(cd "${1:-$ROOT/target/cuda/dist}" 2>/dev/null && pwd)" || fatal "no folder ${1:-$ROOT/target/cuda/dist} (run scripts/build-cuda.sh, or name the binaries' folder)"
[[ -x "$BIN/mora-cache" && -x "$BIN/mora-exec" ]] || fatal "no mora-cache and mora-exec in $BIN (run scripts/build-cuda.sh)"

ALL_STEPS="machine correctness generate faults attach sharing figures peers-text images peers-image python loads"
# Each step's own timeout in seconds, sized for an H100 at the default sizes.
declare -A STEP_TIMEOUT=(
    [machine]=60 [correctness]=120 [generate]=180 [faults]=180 [attach]=240 [sharing]=120
    [figures]=150 [peers-text]=150 [images]=180 [peers-image]=240 [python]=90 [loads]=240
)
export DEVICE="${DEVICE:-cuda:0}"
export RUNS="${RUNS:-3}"
BUDGET="${BUDGET:-480}"
SCALE="${STEP_TIMEOUT_SCALE:-1}"
STEPS="${STEPS:-$ALL_STEPS}"
SKIP="${SKIP:-}"
REQUIRE="${REQUIRE:-}"
export EMBED_SIZE="${EMBED_SIZE:-43570176}" EMBED_MODEL="${EMBED_MODEL:-synth}"
export GEN_SIZE="${GEN_SIZE:-256MiB}" GEN_TOKENS="${GEN_TOKENS:-128}"
export ATTACH_SIZE="${ATTACH_SIZE-14GiB}"
export FAULT_CLIENTS="${FAULT_CLIENTS:-50}" SHARE_TEXTS="${SHARE_TEXTS:-4000}"
export SYNTH_SIZES="${SYNTH_SIZES-1GB}"
export IMG_SIZE="${IMG_SIZE:-1900MiB}" IMG_STEPS="${IMG_STEPS:-20}" IMG_WIDTH="${IMG_WIDTH:-512}" IMG_HEIGHT="${IMG_HEIGHT:-512}"
export LOAD_SIZE="${LOAD_SIZE-2GiB}"
for s in $STEPS $SKIP $REQUIRE; do
    [[ " $ALL_STEPS " == *" $s "* ]] || fatal "unknown step \`$s\`: the steps are $ALL_STEPS"
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || fatal "RUNS=$RUNS: a whole number of at least 1"
[[ $BUDGET =~ ^[0-9]+$ ]] || fatal "BUDGET=$BUDGET: seconds, a whole number"

export BIN ROOT
export GPU_DIR="$ROOT/scripts/gpu"
export FIXTURES="${FIXTURES:-$ROOT/tests/fixtures/image/pipelines}"
if [[ -z ${WHEELS:-} ]]; then
    WHEELS="$BIN"
    [[ -d $BIN/../wheels ]] && WHEELS="$(cd "$BIN/../wheels" && pwd)"
fi
export WHEELS
WORK="$(mktemp -d "${WORK_DIR:-${TMPDIR:-/tmp}}/mora-gpu-check.XXXXXX")" || fatal "cannot make a scratch folder"
export WORK MODELS="$WORK/models"
mkdir -p "$MODELS" "$WORK/steps"
export HF_HUB_CACHE="${MORA_TEST_HF_CACHE:-${HF_HUB_CACHE:-$ROOT/.mora-test/hf-hub}}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log() { echo "gpu-check: $*" >&2; }

export GPU=0
if [[ $DEVICE == cuda* ]]; then
    GPU=1
    command -v nvidia-smi >/dev/null || fatal "DEVICE=$DEVICE but nvidia-smi is missing: is this a GPU machine? (DEVICE=cpu rehearses)"
elif [[ $DEVICE != cpu ]]; then
    fatal "DEVICE=$DEVICE: cpu or cuda:N"
fi
PY="${TORCH_PYTHON:-/opt/torch/.venv/bin/python3}"
[[ -x $PY ]] || PY="$(command -v python3)"
export PY
HOSTPY="$(command -v python3 || echo "$PY")"
export HOSTPY
# cuBLAS, cuRAND and NVRTC 13 from the nvidia-* wheels PyTorch brings.
if ((GPU)); then
    libs="$("$PY" - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
dirs = {os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
PY
)"
    export NVIDIA_LIB_DIRS="$libs"
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# -- models made in the background --------------------------------------------
BG_PIDS=()
CURRENT_STEP_PID=""
# shellcheck disable=SC2317 # run by the trap
cleanup() {
    local p
    [[ -n $CURRENT_STEP_PID ]] && kill -TERM "$CURRENT_STEP_PID" 2>/dev/null
    for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    # Whatever a step left running (its own trap normally stops it).
    for f in "$WORK"/steps/*/pids.clients "$WORK"/steps/*/pids.daemons; do
        [[ -f $f ]] || continue
        while read -r p _; do kill -9 "$p" 2>/dev/null; done <"$f"
    done
    [[ -n ${KEEP_WORK:-} ]] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# background NAME ARCH SIZE DTYPE: `mora-exec synth` in the background, so the
# steps before the one that needs it run meanwhile (one core busy).
background() {
    local dir="$MODELS/$1"
    touch "$dir.pending"
    (
        t0="$(date +%s%3N)"
        if "$BIN/mora-exec" synth --arch "$2" --size "$3" --dtype "$4" -o "$dir" >"$dir.synth" 2>&1; then
            echo "$(($(date +%s%3N) - t0))" >"$dir.synth-ms"
            touch "$dir/.done"
        fi
        rm -f "$dir.pending"
    ) &
    BG_PIDS+=($!)
}
wanted() { [[ " $STEPS " == *" $1 "* && " $SKIP " != *" $1 "* ]]; }
if wanted attach && [[ -n $ATTACH_SIZE ]]; then
    log "making the ${ATTACH_SIZE} llama for the attach step in the background"
    background attach llama "$ATTACH_SIZE" bf16
fi

# -- the steps ---------------------------------------------------------------
elapsed() { echo $(($(date +%s) - START_S)); }
ORDER=""
for step in $ALL_STEPS; do
    [[ " $STEPS " == *" $step "* ]] && ORDER+="$step "
done
for step in $ORDER; do
    dir="$WORK/steps/$step"
    mkdir -p "$dir"
    if [[ " $SKIP " == *" $step "* ]]; then
        echo "skipped: SKIP names it" >"$dir/status"; echo 0 >"$dir/seconds"
        continue
    fi
    left=$((BUDGET - $(elapsed)))
    limit="$(awk -v t="${STEP_TIMEOUT[$step]}" -v s="$SCALE" 'BEGIN { printf "%d", t * s }')"
    ((limit > left)) && limit=$left
    ((limit < 1)) && limit=1
    if ((left < 15)); then
        echo "skipped: the run's budget (${BUDGET} s) was spent" >"$dir/status"; echo 0 >"$dir/seconds"
        log "$step: skipped, the run's budget is spent"
        continue
    fi
    log "$step (at most $limit s; $left s of the budget left)"
    t0="$(date +%s%3N)"
    STEP="$step" STEP_DIR="$dir" timeout -k 20 "$limit" bash "$GPU_DIR/$step.sh" >"$dir/stdout" 2>"$dir/log" &
    CURRENT_STEP_PID=$!
    wait "$CURRENT_STEP_PID"
    rc=$?
    CURRENT_STEP_PID=""
    secs="$(awk -v a="$t0" -v b="$(date +%s%3N)" 'BEGIN { printf "%.1f", (b - a) / 1000 }')"
    echo "$secs" >"$dir/seconds"
    failed="$(awk -F'\t' '$1 == "check" && $3 == "fail" { printf "%s%s", sep, $2; sep = ", " }' "$dir/records.tsv" 2>/dev/null)"
    if [[ -f $dir/skipped ]]; then
        status="skipped: $(head -1 "$dir/skipped")"
    elif ((rc == 124 || rc == 137)); then
        status="error: timed out after $limit s"
    elif ((rc != 0)); then
        why="$(head -1 "$dir/error" 2>/dev/null)"
        [[ -n $why ]] || why="$(grep -v '^\s*$' "$dir/log" | tail -1)"
        status="error: ${why:-exit status $rc}"
    elif [[ -n $failed ]]; then
        status="fail: $failed"
    else
        status="pass"
    fi
    echo "$status" >"$dir/status"
    log "$step: $status ($secs s)"
    # Anything the step left behind (its trap stops what it started).
    for f in "$dir/pids.clients" "$dir/pids.daemons"; do
        [[ -f $f ]] || continue
        while read -r p _; do kill -9 "$p" 2>/dev/null; done <"$f"
    done
done

# -- the report ---------------------------------------------------------------
report_dir="${OUT:-$WORK/report}"
mkdir -p "$report_dir"
"$HOSTPY" "$GPU_DIR/report.py" --steps "$WORK/steps" --order "$ORDER" --md "$report_dir/gpu-results.md" \
    --json "$report_dir/gpu-check.json" --elapsed "$(elapsed)" --budget "$BUDGET" --runs "$RUNS" --device "$DEVICE" \
    --command "$(printf '%s ' DEVICE="$DEVICE" RUNS="$RUNS" BUDGET="$BUDGET" EMBED_SIZE="$EMBED_SIZE" GEN_SIZE="$GEN_SIZE" \
        ATTACH_SIZE="$ATTACH_SIZE" FAULT_CLIENTS="$FAULT_CLIENTS" SHARE_TEXTS="$SHARE_TEXTS" SYNTH_SIZES="$SYNTH_SIZES" \
        IMG_SIZE="$IMG_SIZE" LOAD_SIZE="$LOAD_SIZE")scripts/gpu-check.sh" \
    || fatal "the report could not be written"
if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT/logs"
    for dir in "$WORK"/steps/*/; do
        step="$(basename "$dir")"
        for f in log stdout; do [[ -s $dir/$f ]] && cp "$dir/$f" "$OUT/logs/$step.$f"; done
        for f in "$dir"/*.log; do [[ -s $f ]] && cp "$f" "$OUT/logs/$step.$(basename "$f")"; done
    done
    log "report in $OUT/gpu-results.md, JSON in $OUT/gpu-check.json, logs in $OUT/logs"
fi
cat "$report_dir/gpu-results.md"

# The verdict: a failed or broken step fails the run; REQUIRE'd steps must pass.
rc=0
for step in $ORDER; do
    status="$(cat "$WORK/steps/$step/status" 2>/dev/null || echo "error: no status")"
    case "$status" in
        fail*|error*) log "FAILED $step: $status"; rc=1 ;;
    esac
    if [[ " $REQUIRE " == *" $step "* && $status != pass ]]; then
        log "REQUIRED $step did not pass: $status"; rc=1
    fi
done
log "done in $(elapsed) s"
exit "$rc"
