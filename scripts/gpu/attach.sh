#!/usr/bin/env bash
# Step `attach`: a synthetic llama of ATTACH_SIZE (default 14 GiB, bf16; made
# in the background from the start of the run): the daemon's load time and
# GB/s, a client's handle open + tensor wrap (goal: at most 5 ms), then 4
# clients at once on one copy (nvidia-smi and `ps --json` sampled meanwhile),
# and the Python package's state_dict on the device.
# shellcheck source=scripts/gpu/lib.sh
source "$GPU_DIR/lib.sh"

[[ -n $ATTACH_SIZE ]] || skip_step "ATTACH_SIZE is empty"
dir="$(model attach llama "$ATTACH_SIZE" bf16)" || exit 1
bytes="$(stat -c %s "$dir/model.safetensors")"
shape="$(synth_line attach | sed -n 's/.*(\(.*\))/\1/p')"
figure "synthesis" "$(cat "$MODELS/attach.synth-ms" 2>/dev/null || echo n/a)" ms "mora-exec synth of $(mib_of "$bytes") MiB ($shape), one core"
daemon_start main
((GPU)) && idle_mib="$(gpu_used_mib)"

log "loading $(mib_of "$bytes") MiB into the daemon on $DEVICE"
t0="$(now_ms)"
"$BIN/mora-cache" load "$dir" --dtype bf16 --device "$DEVICE" >"$STEP_DIR/load.out" 2>&1 || die "mora-cache load failed: $(tail -1 "$STEP_DIR/load.out")"
load_wall=$(($(now_ms) - t0))
read -r mib ms gbs _ < <(loads_logged "$STEP_DIR/main.log" | tail -1) || true
figure "daemon load" "${ms:-n/a}" ms "$mib MiB read, converted, copied to $DEVICE (the daemon's own timing; the file was just written, so likely in the page cache); mora-cache load took $load_wall ms"
figure "daemon load rate" "${gbs:-n/a}" GB/s "file bytes over the load time"
((GPU)) && loaded_mib="$(gpu_used_mib)"

generate_workflow "$STEP_DIR/one.toml" "$dir" "$DEVICE" bf16 1
log "one client: handle open + wrap"
IFS='|' read -r wall dev map < <(run_once "$STEP_DIR/one.toml" "$STEP_DIR/out-one") || true
is_num "${wall:-}" || die "the client's run failed"
built="$(sed -n 's/.*model built in \([0-9]*\) ms.*/\1/p' "$STEP_DIR/out-one.log" | head -1)"
figure "handle open + wrap" "${map:-n/a}" ms "mora-exec's \"mapped in\": IPC open (or memfd map) and a tensor view of each of the model's tensors"
figure "client device open" "${dev:-n/a}" ms "the client's CUDA context"
figure "client wall" "$wall" ms "one token generated; model built in ${built:-n/a} ms"
check "attach within 5 ms" "$(pass_if "${map:-}" '<=' 5)" "handle open + wrap ${map:-n/a} ms for $(mib_of "$bytes") MiB"

log "4 clients at once"
: >"$STEP_DIR/samples"
(
    while :; do
        if ((GPU)); then
            { echo "used $(gpu_used_mib)"
              nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null | sed 's/^/app /'
            } >>"$STEP_DIR/samples"
        fi
        sleep 0.1
    done
) &
sampler=$!
track "$sampler"
pids=()
for i in 1 2 3 4; do
    run_once "$STEP_DIR/one.toml" "$STEP_DIR/out-four-$i" >"$STEP_DIR/four-$i.row" &
    pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
kill "$sampler" 2>/dev/null
maps="$(for i in 1 2 3 4; do cut -d'|' -f3 "$STEP_DIR/four-$i.row"; done | grep . | sort -g | tr '\n' ' ')"
max_leases="$(most_leases "$STEP_DIR/main.log")"
entries="$(ps_json | "$HOSTPY" -c 'import json, sys; print(len(json.load(sys.stdin)))' 2>/dev/null)"
check "4 clients at once" "$([[ $failed == 0 ]] && echo pass || echo fail)" "$failed failed; handle open + wrap per client: ${maps:-n/a}ms; most leases seen at once: $max_leases"
check "one resident copy" "$([[ $entries == 1 ]] && echo pass || echo fail)" "mora-cache ps lists $entries model(s)"
md "Model: synthetic llama, $(mib_of "$bytes") MiB bf16 ($shape). Load: ${ms:-n/a} ms, ${gbs:-n/a} GB/s. One client: handle open + wrap ${map:-n/a} ms (goal ≤ 5 ms), device open ${dev:-n/a} ms, wall $wall ms for one token. 4 clients at once: handle open + wrap ${maps:-n/a}ms."
if ((GPU)); then
    peak="$(awk '$1 == "used" { if ($2 > m) m = $2 } END { print m + 0 }' "$STEP_DIR/samples")"
    model_mib=$((bytes / 1048576))
    grew=$((peak - loaded_mib))
    check "no client copies the model" "$(pass_if "$grew" '<' "$model_mib")" \
        "GPU memory: $idle_mib MiB with the daemon idle, $loaded_mib MiB with the model, at most $peak MiB with 4 clients (+$grew MiB, their contexts and activations; a copy would add $model_mib MiB)"
    daemon_pid="$(cat "$STEP_DIR/main.pid")"
    awk -F'[ ,]+' -v d="$daemon_pid" '$1 == "app" { if ($2 == d) { if ($3 > dm) dm = $3 } else if ($3 > cm[$2]) cm[$2] = $3 }
        END { if (dm == "") { print "nvidia-smi lists no process of this container"; exit }
              printf "daemon %d MiB", dm; for (p in cm) printf "; client %s %d MiB", p, cm[p]; printf "\n" }' \
        "$STEP_DIR/samples" >"$STEP_DIR/per-process"
    figure "GPU memory per process" "$(cat "$STEP_DIR/per-process")" "" "most seen during the 4 clients"
    md "" "GPU memory: $idle_mib MiB in use with the daemon idle, $loaded_mib MiB with the model resident, at most $peak MiB with the 4 clients; per process (nvidia-smi, most seen): $(cat "$STEP_DIR/per-process")."
else
    needs_gpu "no client copies the model" "nvidia-smi during the 4 clients"
fi

# The Python package: state_dict of the resident model on the device.
if why="$(torch_ok safetensors)" && pylib="$(mora_pylib 2>"$STEP_DIR/pylib.err")"; then
    if out="$(PYTHONPATH="$pylib" "$PY" - "$dir" "$DEVICE" 2>"$STEP_DIR/py.err" <<'PY'
import sys, time
import torch
import mora
d, dev = sys.argv[1:3]
client = mora.connect(autostart=False)
t = time.perf_counter()
sd = client.state_dict(d, dtype="bfloat16", device=dev)
first = (time.perf_counter() - t) * 1000
t = time.perf_counter()
sd2 = client.state_dict(d, dtype="bfloat16", device=dev)
again = (time.perf_counter() - t) * 1000
print(f"{first:.1f} {again:.1f} {len(sd)}")
PY
)"; then
        read -r first again n <<<"$out"
        figure "mora.state_dict on $DEVICE" "$first" ms "$n torch tensors over the daemon's allocation; again in the same process $again ms"
        md "" "Python: \`mora.state_dict(dtype=\"bfloat16\", device=\"$DEVICE\")\` of the resident model: $first ms for $n tensors (again: $again ms)."
    else
        check "mora.state_dict" fail "$(tail -1 "$STEP_DIR/py.err")"
    fi
else
    check "mora.state_dict" skip "skipped: ${why:-$(tail -1 "$STEP_DIR/pylib.err")}"
fi
