#!/usr/bin/env bash
# Step `sharing`: 4 clients at once embed SHARE_TEXTS texts each with the
# embedding model on $DEVICE: none fails, their outputs are identical, and
# nvidia-smi's most memory seen per process.
# shellcheck source=scripts/gpu/lib.sh
source "$GPU_DIR/lib.sh"

embed_model
daemon_start main
daemon="$DAEMON_PID"
"$HOSTPY" -c "
import random, sys
random.seed(0)
words = 'a man woman is eating food bread riding horse playing drums the new movie cheetah running prey'.split()
for _ in range(int(sys.argv[1])): print(' '.join(random.choice(words) for _ in range(24)))" "$SHARE_TEXTS" >"$STEP_DIR/many.txt"
embed_workflow "$STEP_DIR/many.toml" "$EMBED_LINE" "$DEVICE" 'texts_file = "many.txt"'
run_once "$STEP_DIR/many.toml" "$STEP_DIR/out-cold" >/dev/null || die "the first run failed"
((GPU)) && idle_mib="$(gpu_used_mib)"

log "4 clients at once, $SHARE_TEXTS texts each"
: >"$STEP_DIR/smi.csv"
if ((GPU)); then
    ( while :; do
        nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits >>"$STEP_DIR/smi.csv" 2>/dev/null
        echo "used, $(gpu_used_mib)" >>"$STEP_DIR/smi.csv"
        sleep 0.1
    done ) &
    track $!
    sampler=$!
fi
pids=()
t0="$(now_ms)"
for i in 1 2 3 4; do
    "$BIN/mora-exec" run "$STEP_DIR/many.toml" -o "$STEP_DIR/out-many-$i" --no-autostart >"$STEP_DIR/many-$i.log" 2>&1 &
    pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
wall=$(($(now_ms) - t0))
((GPU)) && kill "$sampler" 2>/dev/null
same=yes
for i in 2 3 4; do cmp -s "$STEP_DIR/out-many-1/embeddings.json" "$STEP_DIR/out-many-$i/embeddings.json" || same=no; done
check "4 clients succeed" "$([[ $failed == 0 ]] && echo pass || echo fail)" "$failed failed$( ((failed)) && echo ": $(grep -h error "$STEP_DIR"/many-*.log | head -1)")"
check "outputs identical" "$([[ $same == yes ]] && echo pass || echo fail)" "the 4 embeddings files, byte for byte"
most="$(most_leases "$STEP_DIR/main.log")"
figure "4 clients wall" "$wall" ms "$SHARE_TEXTS texts each, all four from start to the last exit; most leases open at once $most"
md "Model: $EMBED_NAME; $SHARE_TEXTS texts of 24 words per client; 4 clients from start to the last exit: $wall ms; at most $most leases open at once."
if ((GPU)); then
    client_pids=" ${pids[*]} "
    line="$(awk -F', *' -v d="$daemon" -v c="$client_pids" -v idle="$idle_mib" '
        $1 == "used" { if ($2 > used) used = $2; next }
        $1 == d { if ($2 > dm) dm = $2 }
        index(c, " " $1 " ") { if ($2 > cm[$1]) cm[$1] = $2 }
        END {
            if (dm == "") printf "nvidia-smi lists no process of this container"
            else { printf "daemon %d MiB", dm; n = 0; for (p in cm) { printf "; client %s %d MiB", p, cm[p]; n++ }; printf " (%d of 4 clients seen)", n }
            printf "; GPU in use at most %d MiB, %d MiB before the clients\n", used, idle
        }' "$STEP_DIR/smi.csv")"
    figure "GPU memory per process" "$line" "" "most seen while the 4 clients ran"
    md "" "nvidia-smi, most memory seen: $line."
else
    needs_gpu "GPU memory per process" "nvidia-smi while the 4 clients run"
fi
