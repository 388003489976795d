#!/usr/bin/env bash
# Step `correctness`: the embedding model on $DEVICE, lent by the daemon and
# loaded in-process (--no-cache), against the CPU (f32, --no-cache); the cold
# run's figures.
# shellcheck source=scripts/gpu/lib.sh
source "$GPU_DIR/lib.sh"

embed_model
daemon_start main
embed_workflow "$STEP_DIR/dev.toml" "$EMBED_LINE" "$DEVICE" "$TEXTS"
embed_workflow "$STEP_DIR/cpu.toml" "$EMBED_LINE" cpu "$TEXTS"

log "$EMBED_NAME: cold run on $DEVICE, CPU reference"
IFS='|' read -r cold_wall cold_dev cold_map < <(run_once "$STEP_DIR/dev.toml" "$STEP_DIR/out-cold") || true
[[ -n ${cold_wall:-} ]] || die "the cold run on $DEVICE failed"
run_once "$STEP_DIR/cpu.toml" "$STEP_DIR/out-cpu" --no-cache >/dev/null || die "the CPU reference run failed"
run_once "$STEP_DIR/dev.toml" "$STEP_DIR/out-nc" --no-cache >/dev/null || die "the --no-cache run on $DEVICE failed"
cached="$(max_abs_diff "$STEP_DIR/out-cold/embeddings.json" "$STEP_DIR/out-cpu/embeddings.json")"
nocache="$(max_abs_diff "$STEP_DIR/out-nc/embeddings.json" "$STEP_DIR/out-cpu/embeddings.json")"
check "lent weights on $DEVICE vs CPU" "$(pass_if "$cached" '<=' 1e-4)" "max |difference| per component $cached (limit 1e-4), $EMBED_NAME, 8 texts"
check "--no-cache on $DEVICE vs CPU" "$(pass_if "$nocache" '<=' 1e-4)" "max |difference| per component $nocache (limit 1e-4)"
figure "cold wall" "$cold_wall" ms "the daemon loads the model, then the run"
figure "cold device open" "${cold_dev:-n/a}" ms "CUDA context of the client"
figure "cold map" "${cold_map:-n/a}" ms "IPC open + wrap (GPU) or memfd map (CPU)"
md "Model: $EMBED_NAME. Cold run (the daemon loads it): wall $cold_wall ms, device open ${cold_dev:-n/a} ms, map ${cold_map:-n/a} ms."
while read -r mib ms gbs _; do
    md "" "Daemon load: $mib MiB in $ms ms, $gbs GB/s (read, converted, copied to $DEVICE)."
done < <(loads_logged "$STEP_DIR/main.log")
