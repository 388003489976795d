#!/usr/bin/env bash
# Step `faults`:
# 1. FAULT_CLIENTS clients on $DEVICE, each killed with SIGKILL at a random
#    moment (0 to 1.5x a warm run), FAULT_PARALLEL at a time, while a live
#    client runs the same workflow over and over: the daemon keeps serving, the
#    live client's outputs stay equal to the reference, leases return to 0,
#    the daemon's descriptors and its GPU memory return to what they were with
#    the model resident and no client.
# 2. The daemon killed with SIGKILL under a client that is generating: the
#    client's exit status and its one-line error, and the GPU memory released.
# shellcheck source=scripts/gpu/lib.sh
source "$GPU_DIR/lib.sh"

PARALLEL="${FAULT_PARALLEL:-8}"
embed_model
daemon_start main
pid="$DAEMON_PID"
embed_workflow "$STEP_DIR/w.toml" "$EMBED_LINE" "$DEVICE" "$TEXTS"
run_once "$STEP_DIR/w.toml" "$STEP_DIR/out-ref" >/dev/null || die "the reference run failed"
IFS='|' read -r warm _ < <(run_once "$STEP_DIR/w.toml" "$STEP_DIR/out-warm") || true
is_num "${warm:-}" || die "the warm run failed"
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
base_fds="$(fds "$pid")"
base_bytes="$(resident_bytes "$MORA_SOCKET")"
# daemon_mib: the daemon's GPU memory as nvidia-smi lists it, else the whole GPU's.
mem_how="the GPU's memory in use (nvidia-smi lists no process of this container)"
daemon_mib() {
    local m
    m="$(proc_gpu_mib "$pid")"
    if [[ -n $m ]]; then mem_how="the daemon's process in nvidia-smi"; echo "$m"; else gpu_used_mib; fi
}
((GPU)) && base_mib="$(daemon_mib)"

# -- the live client -------------------------------------------------------------
(
    i=0
    while [[ ! -f $STEP_DIR/stop-live ]]; do
        i=$((i + 1))
        if run_once "$STEP_DIR/w.toml" "$STEP_DIR/out-live" >/dev/null 2>"$STEP_DIR/live.err"; then
            d="$(max_abs_diff "$STEP_DIR/out-live/embeddings.json" "$STEP_DIR/out-ref/embeddings.json")"
            if [[ $(pass_if "$d" '<=' 1e-6) == pass ]]; then echo ok; else echo "differs: max |difference| $d"; fi
        else
            echo "failed: $(tail -1 "$STEP_DIR/live.err")"
        fi >>"$STEP_DIR/live.txt"
    done
) &
live=$!
track "$live"

# -- clients killed at random moments ----------------------------------------
log "$FAULT_CLIENTS clients killed with SIGKILL at random moments (0 to $((warm * 3 / 2)) ms), $PARALLEL at a time"
RANDOM=40
killed=0; finished=0; errored=0; n=0
while ((n < FAULT_CLIENTS)); do
    wave=(); killers=()
    for _ in $(seq "$PARALLEL"); do
        ((n < FAULT_CLIENTS)) || break
        n=$((n + 1))
        "$BIN/mora-exec" run "$STEP_DIR/w.toml" -o "$STEP_DIR/out-victim-$n" --no-autostart >/dev/null 2>&1 &
        c=$!
        track "$c"
        delay_ms=$(((RANDOM * 32768 + RANDOM) % (warm * 3 / 2 + 1)))
        ( sleep "$(awk -v m="$delay_ms" 'BEGIN { printf "%.3f", m / 1000 }')"; kill -9 "$c" 2>/dev/null ) &
        killers+=($!)
        wave+=("$c")
    done
    for c in "${wave[@]}"; do
        wait "$c"
        case $? in
            0) finished=$((finished + 1)) ;;
            137) killed=$((killed + 1)) ;;
            *) errored=$((errored + 1)) ;;
        esac
    done
    # A killer whose client finished first: no kill left to make.
    kill "${killers[@]}" 2>/dev/null
done
touch "$STEP_DIR/stop-live"
wait "$live" 2>/dev/null
live_runs="$(wc -l <"$STEP_DIR/live.txt" 2>/dev/null || echo 0)"
live_ok="$(grep -c '^ok$' "$STEP_DIR/live.txt" 2>/dev/null)"
live_bad="$(grep -v '^ok$' "$STEP_DIR/live.txt" 2>/dev/null | head -1)"
figure "clients killed" "$killed" "" "of $FAULT_CLIENTS; $finished finished before their kill, $errored exited with an error"
check "kills landed" "$(pass_if "$killed" '>=' "$((FAULT_CLIENTS / 4))")" "$killed of $FAULT_CLIENTS clients killed while running (at least a quarter)"
if ((live_runs > 0 && live_ok == live_runs)); then
    check "live client right" pass "$live_runs runs during the kills, every output equal to the reference"
else
    check "live client right" fail "$live_ok of $live_runs runs right; first wrong: ${live_bad:-none ran}"
fi

# -- what the kills left --------------------------------------------------------
open=""
for _ in $(seq 150); do open="$(leases "$MORA_SOCKET")"; [[ $open == 0 ]] && break; sleep 0.1; done
check "leases return to 0" "$([[ $open == 0 ]] && echo pass || echo fail)" "open leases after the kills: ${open:-ps failed}"
if kill -0 "$pid" 2>/dev/null && run_once "$STEP_DIR/w.toml" "$STEP_DIR/out-after" >/dev/null; then
    d="$(max_abs_diff "$STEP_DIR/out-after/embeddings.json" "$STEP_DIR/out-ref/embeddings.json")"
    check "daemon still serves" "$(pass_if "$d" '<=' 1e-6)" "a run after the kills: max |difference| from the reference $d"
else
    check "daemon still serves" fail "the daemon is gone or the run after the kills failed: $(tail -1 "$STEP_DIR/main.log")"
fi
now_fds=""
for _ in $(seq 100); do now_fds="$(fds "$pid")"; ((now_fds <= base_fds)) && break; sleep 0.1; done
check "daemon descriptors back" "$(pass_if "$now_fds" '<=' "$base_fds")" "$now_fds open, $base_fds before the kills"
if ((GPU)); then
    now_mib=""
    for _ in $(seq 100); do now_mib="$(daemon_mib)"; [[ $(pass_if "$now_mib" '<=' "$((base_mib + 2))") == pass ]] && break; sleep 0.1; done
    check "GPU memory back" "$(pass_if "$now_mib" '<=' "$((base_mib + 2))")" \
        "$now_mib MiB after the kills, $base_mib MiB before ($mem_how); resident models $(mib_of "${base_bytes:-0}") MiB, the rest the daemon's CUDA context"
else
    needs_gpu "GPU memory back" "nvidia-smi: the daemon's memory after the kills against before"
fi
md "$FAULT_CLIENTS clients of the embedding workflow ($EMBED_NAME) on $DEVICE, killed with SIGKILL 0 to $((warm * 3 / 2)) ms after they start (a warm run takes $warm ms), $PARALLEL at a time: $killed killed, $finished finished first, $errored failed; a live client ran $live_runs times meanwhile."

# -- the daemon killed under a running client -------------------------------
gen="$(model gen llama "$GEN_SIZE" bf16)" || exit 1
generate_workflow "$STEP_DIR/long.toml" "$gen" "$DEVICE" bf16 480
daemon_stop main
((GPU)) && before_mib="$(gpu_used_mib)"
daemon_start victim
victim="$DAEMON_PID"
sock="$STEP_DIR/victim.sock"
log "the daemon killed with SIGKILL while a client generates 480 tokens"
MORA_SOCKET="$sock" "$BIN/mora-exec" run "$STEP_DIR/long.toml" -o "$STEP_DIR/out-long" --no-autostart >/dev/null 2>"$STEP_DIR/long.err" &
client=$!
track "$client"
# The lease is granted with the weights loaded (the daemon logs it): the
# client maps them, builds the model and generates from there on.
held=no
for _ in $(seq 3000); do
    grep -q '"lease granted"' "$STEP_DIR/victim.log" && { held=yes; break; }
    kill -0 "$client" 2>/dev/null || break
    sleep 0.02
done
sleep 0.15
landed=0
kill -0 "$client" 2>/dev/null && landed=1
kill -9 "$victim" 2>/dev/null
t_kill="$(now_ms)"
hung=1
for _ in $(seq 600); do kill -0 "$client" 2>/dev/null || { hung=0; break; }; sleep 0.1; done
((hung)) && kill -9 "$client" 2>/dev/null
wait "$client"
rc=$?
t_end="$(now_ms)"
lines="$(grep -vc 'the cache daemon is loading' "$STEP_DIR/long.err")"
line="$(grep -v 'the cache daemon is loading' "$STEP_DIR/long.err" | tail -1)"
figure "client exit status" "$rc" "" "$((t_end - t_kill)) ms after the kill; stderr: ${line:-nothing}"
if ((landed == 0)); then
    check "daemon killed under a client" fail "the client ended before the kill landed (its lease granted: $held): make GEN_SIZE larger"
elif ((hung)); then
    check "client ends after the daemon's death" fail "the client still ran 60 s after the daemon was killed"
elif ((rc == 0)); then
    note=""
    ((GPU)) || note=": host weights live on in the memfd it maps"
    check "client ends after the daemon's death" pass "it finished its run (exit 0)$note"
else
    ok=fail
    ((lines == 1)) && [[ $line == "mora-exec: error:"* ]] && ok=pass
    check "client ends after the daemon's death" "$ok" "exit status $rc, $lines line(s) on stderr, the last: $line"
fi
if ((GPU)); then
    after_mib=""
    for _ in $(seq 100); do after_mib="$(gpu_used_mib)"; [[ $(pass_if "$after_mib" '<=' "$((before_mib + 64))") == pass ]] && break; sleep 0.1; done
    still="$(proc_gpu_mib "$victim")"
    check "GPU memory released" "$( [[ -z $still ]] && pass_if "$after_mib" '<=' "$((before_mib + 64))" || echo fail)" \
        "GPU memory in use $after_mib MiB after the client's exit, $before_mib MiB before the daemon started${still:+; nvidia-smi still lists the daemon with $still MiB}"
else
    needs_gpu "GPU memory released" "nvidia-smi after the daemon's death"
fi
md "" "The daemon killed with SIGKILL while a client generated up to 480 tokens ($GEN_SIZE llama, $DEVICE): the client exited with status $rc; its stderr: \`${line:-nothing}\`."
