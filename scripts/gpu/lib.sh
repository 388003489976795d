# shellcheck shell=bash
# What every step of scripts/gpu-check.sh shares: how it records checks and
# figures, starts and stops its own daemons, makes the synthetic models, runs
# mora-exec and reads what it prints. Sourced by scripts/gpu/<step>.sh, which
# scripts/gpu-check.sh runs one process each, under a timeout.
#
# The runner exports: BIN (mora-cache, mora-exec), GPU_DIR (this folder), WORK
# (scratch shared by the steps), MODELS (synthetic models, made once per run),
# STEP and STEP_DIR (this step's name and folder), DEVICE, GPU (1 on a GPU),
# RUNS, PY (the python with torch, may lack it), HOSTPY (a python with the
# standard library), WHEELS (wheels to install), FIXTURES, the sizes.
#
# A step records what it finds in $STEP_DIR/records.tsv, one line each:
#   check  NAME  pass|fail|skip  DETAIL       a goal met or missed
#   figure NAME  VALUE  UNIT  DETAIL          a measurement
#   fact   NAME  VALUE                        what the machine is
# and its part of the report in $STEP_DIR/report.md. A failed check fails the
# step and the steps after it still run; `die` ends the step with an error;
# `skip_step` marks it skipped, with the reason, before it ends.

set -uo pipefail

log() { echo "gpu-check[$STEP]: $*" >&2; }
die() {
    echo "gpu-check[$STEP]: error: $*" >&2
    printf '%s\n' "$*" >"$STEP_DIR/error"
    exit 1
}
skip_step() {
    printf '%s\n' "$*" >"$STEP_DIR/skipped"
    log "skipped: $*"
    exit 0
}

# oneline TEXT...: tabs and newlines out, so that a record stays one line.
oneline() { printf '%s' "$*" | tr '\t\n\r' '   '; }
rec() {
    local IFS=$'\t'
    local fields=()
    local f
    for f in "$@"; do fields+=("$(oneline "$f")"); done
    printf '%s\n' "${fields[*]}" >>"$STEP_DIR/records.tsv"
}
# check NAME STATUS DETAIL: STATUS pass, fail or skip (skip: say why in DETAIL).
check() {
    local status="$2"
    case "$status" in pass|fail|skip) ;; *) status=fail ;; esac
    rec check "$1" "$status" "${3:-}"
    [[ $status == fail ]] && log "FAIL $1: ${3:-}"
    return 0
}
figure() { rec figure "$1" "${2:-n/a}" "${3:-}" "${4:-}"; }
fact() { rec fact "$1" "${2:-}"; }
md() { printf '%s\n' "$@" >>"$STEP_DIR/report.md"; }
# needs_gpu NAME WHAT: records a check that this machine cannot make.
needs_gpu() { check "$1" skip "skipped: needs a GPU (${2:-})"; }

# -- numbers -----------------------------------------------------------------
now_ms() { date +%s%3N; }
is_num() { [[ ${1:-} =~ ^-?[0-9]+([.][0-9]*)?([eE][-+]?[0-9]+)?$ ]]; }
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# pass_if A OP B: pass when the comparison holds (numbers), fail otherwise or
# when either side is not a number.
pass_if() {
    if ! is_num "$1" || ! is_num "$3"; then echo fail; return; fi
    awk -v a="$1" -v b="$3" -v op="$2" 'BEGIN {
        ok = (op == "<=") ? a <= b : (op == "<") ? a < b : (op == ">=") ? a >= b : (op == ">") ? a > b : (op == "==") ? a == b : 0
        print ok ? "pass" : "fail" }'
}
ratio() {
    if is_num "$1" && is_num "$2"; then
        awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'
    else
        echo n/a
    fi
}
mib_of() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

# -- the GPU -----------------------------------------------------------------
GPU_INDEX="${DEVICE#cuda:}"
[[ $GPU_INDEX =~ ^[0-9]+$ ]] || GPU_INDEX=0
# gpu_used_mib: memory in use on the GPU, every process (nvidia-smi).
gpu_used_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$GPU_INDEX" 2>/dev/null | head -1 | tr -d ' '; }
# proc_gpu_mib PID: what nvidia-smi shows for one process; empty when it does
# not list it (in a container nvidia-smi may list host pids, or none).
proc_gpu_mib() {
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null |
        awk -F', *' -v p="$1" '$1 == p { s += $2; seen = 1 } END { if (seen) print s }'
}

# -- processes ---------------------------------------------------------------
# track PID: a client this step started; killed when the step ends.
track() { echo "$1" >>"$STEP_DIR/pids.clients"; }

# daemon_start NAME [VAR=VALUE...]: a daemon of this step's own, on socket
# $STEP_DIR/NAME.sock, logging JSON lines to $STEP_DIR/NAME.log; waits until it
# listens (and on a GPU until it serves the GPU). Exports MORA_SOCKET for the
# first one started. Sets DAEMON_PID.
daemon_start() {
    local name="$1"; shift
    local sock="$STEP_DIR/$name.sock" logf="$STEP_DIR/$name.log"
    rm -f "$sock"
    env MORA_SOCKET="$sock" MORA_LOG_FORMAT=json "$@" "$BIN/mora-cache" serve --keep-alive -1 2>"$logf" &
    DAEMON_PID=$!
    echo "$DAEMON_PID $sock" >>"$STEP_DIR/pids.daemons"
    echo "$DAEMON_PID" >"$STEP_DIR/$name.pid"
    local _
    for _ in $(seq 600); do
        [[ -S $sock ]] && break
        kill -0 "$DAEMON_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [[ ! -S $sock ]]; then
        tail -5 "$logf" >&2
        die "the daemon ($name) did not start: $(tail -1 "$logf")"
    fi
    if ((GPU)) && ! grep -q '"serving GPU"' "$logf"; then
        tail -5 "$logf" >&2
        die "the daemon ($name) found no usable GPU"
    fi
    [[ -n ${MORA_SOCKET:-} ]] || export MORA_SOCKET="$sock"
}
# daemon_stop NAME: `mora-cache stop`, then SIGKILL if it is still there after 20 s.
daemon_stop() {
    local sock="$STEP_DIR/$1.sock" pid
    pid="$(cat "$STEP_DIR/$1.pid" 2>/dev/null)" || return 0
    MORA_SOCKET="$sock" timeout 10 "$BIN/mora-cache" stop >/dev/null 2>&1
    local _
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
    return 0
}
# ps_json [SOCKET]: `mora-cache ps --json` of this step's daemon.
ps_json() { MORA_SOCKET="${1:-$MORA_SOCKET}" timeout 20 "$BIN/mora-cache" ps --json 2>/dev/null; }
# leases [SOCKET]: open leases on the daemon, every model; empty when ps fails.
leases() { ps_json "$@" | "$HOSTPY" -c 'import json, sys; print(sum(m["leases"] for m in json.load(sys.stdin)))' 2>/dev/null; }
# resident_bytes [SOCKET]: bytes of the resident models on $DEVICE.
resident_bytes() {
    ps_json "$@" | DEV="$DEVICE" "$HOSTPY" -c '
import json, os, sys
dev = os.environ["DEV"]
print(sum(m["bytes"] for m in json.load(sys.stdin) if (m["device"] == "cpu") == (dev == "cpu")))' 2>/dev/null
}
# loads_logged LOG: one line per load the daemon logged: "MIB MS GB_PER_S MODEL".
loads_logged() {
    "$HOSTPY" - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("message") == "resident" or e.get("fields", {}).get("message") == "resident":
        f = e.get("fields", e)
        print(f.get("mib"), f.get("ms"), f.get("gb_per_s"), f.get("model"))
PY
}

# most_leases LOG: the most leases open at once in a daemon's log ("lease
# granted" opens one, "connection closed; releasing its leases" ends N).
most_leases() {
    "$HOSTPY" - "$1" <<'PY'
import json, sys
now = most = 0
for line in open(sys.argv[1], errors="replace"):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("message") == "lease granted":
        now += 1
    elif str(e.get("message", "")).startswith("connection closed; releasing"):
        now -= int(e.get("leases", 0))
    most = max(most, now)
print(most)
PY
}

cleanup_step() {
    local pid sock
    if [[ -f $STEP_DIR/pids.clients ]]; then
        while read -r pid; do kill -9 "$pid" 2>/dev/null; done <"$STEP_DIR/pids.clients"
    fi
    if [[ -f $STEP_DIR/pids.daemons ]]; then
        while read -r pid sock; do
            kill -0 "$pid" 2>/dev/null || continue
            MORA_SOCKET="$sock" timeout 10 "$BIN/mora-cache" stop >/dev/null 2>&1
        done <"$STEP_DIR/pids.daemons"
        local _
        for _ in $(seq 100); do
            local alive=0
            while read -r pid sock; do kill -0 "$pid" 2>/dev/null && alive=1; done <"$STEP_DIR/pids.daemons"
            ((alive)) || break
            sleep 0.1
        done
        while read -r pid sock; do kill -9 "$pid" 2>/dev/null; done <"$STEP_DIR/pids.daemons"
    fi
    return 0
}
trap cleanup_step EXIT
# The runner's timeout sends SIGTERM: end through the EXIT trap.
trap 'exit 143' TERM INT

# -- models ------------------------------------------------------------------
# model NAME ARCH SIZE DTYPE: prints the folder of a synthetic model, made
# once per run (`mora-exec synth`, seed 0) and shared by the steps; waits for
# one the runner makes in the background.
model() {
    local name="$1" arch="$2" size="$3" dtype="$4"
    local dir="$MODELS/$name"
    local _
    if [[ -f $dir.pending ]]; then
        log "waiting for $name ($arch, $size $dtype), made in the background"
        while [[ -f $dir.pending ]]; do sleep 0.5; done
    fi
    if [[ ! -f $dir/.done ]]; then
        rm -rf "$dir"
        local t0; t0="$(now_ms)"
        "$BIN/mora-exec" synth --arch "$arch" --size "$size" --dtype "$dtype" -o "$dir" >"$dir.synth" 2>&1 \
            || die "mora-exec synth --arch $arch --size $size --dtype $dtype failed: $(tail -1 "$dir.synth")"
        echo "$(($(now_ms) - t0))" >"$dir.synth-ms"
        touch "$dir/.done"
    fi
    [[ -f $dir/.done ]] || die "model $name was not made: $(tail -1 "$dir.synth" 2>/dev/null)"
    printf '%s\n' "$dir"
}
# synth_line NAME: what `mora-exec synth` said of a model it made.
synth_line() { head -1 "$MODELS/$1.synth" 2>/dev/null; }

# The embedding model of the correctness, sharing, figures, faults, python
# and text peer steps: a BERT of all-MiniLM-L6-v2's size made here (the real
# one when EMBED_MODEL names it: a repo id in HF_HUB_CACHE, or a folder).
# Sets EMBED_LINE (the workflow's source line), EMBED_SRC (what mora.connect
# and the peers take), EMBED_NAME.
# shellcheck disable=SC2034 # used by the steps
embed_model() {
    if [[ ${EMBED_MODEL:-synth} == synth ]]; then
        EMBED_SRC="$(model embed bert "${EMBED_SIZE:?}" f32)" || exit 1
        EMBED_LINE="path = \"$EMBED_SRC\""
        EMBED_NAME="synthetic BERT f32 ($EMBED_SIZE, $(synth_line embed | sed -n 's/.*(\(.*\))/\1/p'))"
    elif [[ -d $EMBED_MODEL ]]; then
        EMBED_SRC="$EMBED_MODEL"; EMBED_LINE="path = \"$EMBED_MODEL\""; EMBED_NAME="$(basename "$EMBED_MODEL")"
    else
        EMBED_SRC="$EMBED_MODEL"; EMBED_LINE="repo = \"$EMBED_MODEL\""; EMBED_NAME="$EMBED_MODEL"
    fi
}

# -- workflows and runs -----------------------------------------------------
# shellcheck disable=SC2034 # used by the steps
TEXTS='texts = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.", "A cheetah is running behind its prey.", "Two men pushed carts through the woods.", "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.", "Someone in a gorilla costume is playing a set of drums."]'
# shellcheck disable=SC2034
TEXTS_JSON='["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.", "A cheetah is running behind its prey.", "Two men pushed carts through the woods.", "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.", "Someone in a gorilla costume is playing a set of drums."]'

# embed_workflow FILE MODEL_LINES DEVICE TEXTS_LINE
embed_workflow() {
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
# generate_workflow FILE DIR DEVICE DTYPE MAX_TOKENS
generate_workflow() {
    cat >"$1" <<TOML
name = "gpu-check"
[models.m]
path = "$2"
device = "$3"
dtype = "$4"
[[steps]]
name = "gen"
task = "generate"
model = "m"
prompt = "the man is eating a piece of bread with the"
max_tokens = $5
output = "gen.json"
TOML
}
# image_workflow FILE DIR DEVICE DTYPE STEPS [WIDTH HEIGHT]
image_workflow() {
    local size=""
    [[ -n ${6:-} ]] && size="width = $6
height = $7"
    cat >"$1" <<TOML
name = "gpu-check"
[models.sd]
path = "$2"
device = "$3"
dtype = "$4"
[[steps]]
name = "cat"
model = "sd"
task = "image"
prompt = "a photo of a cat, watercolor"
steps = $5
$size
seed = 7
output = "cat.png"
TOML
}

# field LABEL FILE: the number before " ms" after LABEL in mora-exec's report.
field() { sed -n "s/.*$1 \([0-9.]*\) ms.*/\1/p" "$2" | head -1; }
# run_once WORKFLOW OUT_DIR [ARGS...]: one `mora-exec run` (never starting a
# daemon); prints "wall_ms|device_open_ms|map_ms" (device open empty on the
# CPU, map empty with --no-cache). On failure prints mora-exec's error line on
# stderr and returns 1.
run_once() {
    local wf="$1" out="$2"; shift 2
    local t0 t1
    t0="$(now_ms)"
    if ! "$BIN/mora-exec" run "$wf" -o "$out" --no-autostart "$@" >"$out.log" 2>&1; then
        echo "mora-exec run $(basename "$wf") $*: $(grep -m1 'error' "$out.log" || tail -1 "$out.log")" >&2
        return 1
    fi
    t1="$(now_ms)"
    echo "$((t1 - t0))|$(field 'device opened in' "$out.log")|$(field 'mapped in' "$out.log")"
}
# timed NAME WORKFLOW [ARGS...]: RUNS runs; sets NAME_wall, NAME_dev, NAME_map
# (medians) and NAME_out (the last run's output folder); dies on a failed run.
timed() {
    local name="$1" wf="$2"; shift 2
    local rows="$STEP_DIR/$name.times" i
    : >"$rows"
    for i in $(seq "$RUNS"); do
        run_once "$wf" "$STEP_DIR/out-$name-$i" "$@" >>"$rows" || die "run $i of $name failed (see above)"
    done
    printf -v "${name}_wall" '%s' "$(cut -d'|' -f1 "$rows" | median)"
    printf -v "${name}_dev" '%s' "$(cut -d'|' -f2 "$rows" | grep . | median)"
    printf -v "${name}_map" '%s' "$(cut -d'|' -f3 "$rows" | grep . | median)"
    printf -v "${name}_out" '%s' "$STEP_DIR/out-$name-$RUNS"
}
# max_abs_diff A.json B.json: largest difference between two embeddings files.
max_abs_diff() {
    "$HOSTPY" - "$1" "$2" <<'PY'
import json, sys
a, b = (json.load(open(p))["embeddings"] for p in sys.argv[1:3])
if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
    print("shapes-differ")
else:
    print(f"{max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)):.3g}")
PY
}
# json_get FILE EXPR: a value of a JSON file, EXPR in Python over `d`.
json_get() { "$HOSTPY" -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2" 2>/dev/null; }

# shellcheck disable=SC2120 # the modules are optional
# torch_ok [MODULES...]: whether $PY imports torch (and these modules);
# otherwise prints the reason.
torch_ok() {
    local mods="torch${1:+, $*}" err
    mods="${mods// /}"; mods="${mods//,/, }"
    if err="$("$PY" -c "import ${mods}" 2>&1)"; then return 0; fi
    echo "$PY cannot import ${mods}: $(printf '%s\n' "$err" | tail -1)"
    return 1
}
# install_wheels DIR WHEEL...: the wheels unpacked into DIR (put on
# PYTHONPATH), with $PY's pip when it has one, else by unzipping them (what pip
# does for these: pure or abi3 wheels without scripts); nothing from a network.
install_wheels() {
    local lib="$1"; shift
    mkdir -p "$lib"
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index --target "$lib" "$@" >"$lib.log" 2>&1 && return 0
    fi
    "$HOSTPY" - "$lib" "$@" >>"$lib.log" 2>&1 <<'PY'
import sys, zipfile
for w in sys.argv[2:]:
    zipfile.ZipFile(w).extractall(sys.argv[1])
PY
}
# mora_pylib: a folder with the Python package installed from its wheel in
# $WHEELS (once per run); prints it, or the reason on stderr and returns 1.
mora_pylib() {
    local lib="$WORK/pylib" wheel
    if [[ -f $lib/.done ]]; then echo "$lib"; return 0; fi
    wheel="$(ls "$WHEELS"/mora-*.whl 2>/dev/null | head -1)"
    [[ -n $wheel ]] || { echo "no mora-*.whl in $WHEELS (scripts/gpu-bundle.sh puts it there)" >&2; return 1; }
    install_wheels "$lib" "$wheel" || { echo "$(basename "$wheel") did not install: $(tail -1 "$lib.log")" >&2; return 1; }
    PYTHONPATH="$lib" "$PY" -c "import mora" 2>"$lib.err" || { echo "mora does not import from $(basename "$wheel"): $(tail -1 "$lib.err")" >&2; return 1; }
    touch "$lib/.done"
    echo "$lib"
}
