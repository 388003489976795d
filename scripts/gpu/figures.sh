#!/usr/bin/env bash
# Step `figures`: warm runs (weights lent by the daemon) against --no-cache
# runs on $DEVICE, RUNS each, medians: the embedding model, and synthetic bf16
# BERTs of SYNTH_SIZES. Also leaves the embedding model's figures in
# $WORK/figures for the peers-text step.
# shellcheck source=scripts/gpu/lib.sh disable=SC2154 # NAME_wall and the like are set by `timed`
source "$GPU_DIR/lib.sh"

embed_model
daemon_start main
embed_workflow "$STEP_DIR/dev.toml" "$EMBED_LINE" "$DEVICE" "$TEXTS"
run_once "$STEP_DIR/dev.toml" "$STEP_DIR/out-cold" >/dev/null || die "the cold run failed"
log "$EMBED_NAME: $RUNS warm runs, $RUNS --no-cache runs"
timed mw "$STEP_DIR/dev.toml"
timed mn "$STEP_DIR/dev.toml" --no-cache
mkdir -p "$WORK/figures"
echo "$mw_wall $mn_wall" >"$WORK/figures/embed-walls"
rows=("| $EMBED_NAME | ${mw_dev:-n/a} | ${mw_map:-n/a} | $mw_wall | $mn_wall | $(ratio "$mw_wall" "$mn_wall") |")
figure "embed warm wall" "$mw_wall" ms "$EMBED_NAME, median of $RUNS"
figure "embed --no-cache wall" "$mn_wall" ms ""
figure "embed warm map" "${mw_map:-n/a}" ms "IPC open + wrap (GPU) or memfd map (CPU)"
figure "embed warm device open" "${mw_dev:-n/a}" ms "the client's CUDA context"
for size in $SYNTH_SIZES; do
    log "synthetic bf16 BERT of $size"
    dir="$(model "bert-$size" bert "$size" bf16)" || exit 1
    embed_workflow "$STEP_DIR/synth-$size.toml" "path = \"$dir\"
dtype = \"bf16\"" "$DEVICE" "$TEXTS"
    run_once "$STEP_DIR/synth-$size.toml" "$STEP_DIR/out-synth-$size-cold" >/dev/null || die "the cold run of the $size BERT failed"
    timed sw "$STEP_DIR/synth-$size.toml"
    timed sn "$STEP_DIR/synth-$size.toml" --no-cache
    rows+=("| synthetic BERT bf16 ($size) | ${sw_dev:-n/a} | ${sw_map:-n/a} | $sw_wall | $sn_wall | $(ratio "$sw_wall" "$sn_wall") |")
    figure "BERT $size warm wall" "$sw_wall" ms ""
    figure "BERT $size --no-cache wall" "$sn_wall" ms ""
done
md "ms, median of $RUNS; wall = process start to exit, results written."
md "" "| model | device open (context) | IPC open + wrap | warm wall | --no-cache wall | warm / no-cache |"
md "| --- | --- | --- | --- | --- | --- |"
md "${rows[@]}"
