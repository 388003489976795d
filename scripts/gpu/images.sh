#!/usr/bin/env bash
# Step `images`: the diffusers-written tiny pipelines of tests/fixtures (SD 1.5,
# 2.1, XL shapes) on $DEVICE (f16) against the CPU (f32), pixel by pixel; then
# a synthetic SD 1.5 pipeline of IMG_SIZE (f16): IMG_STEPS steps at
# IMG_WIDTH x IMG_HEIGHT, warm against --no-cache. Leaves those figures in
# $WORK/figures for the peers-image step.
# shellcheck source=scripts/gpu/lib.sh disable=SC2154 # NAME_wall and the like are set by `timed`
source "$GPU_DIR/lib.sh"

daemon_start main
dtype_on() { if [[ $1 == cpu ]]; then echo f32; else echo f16; fi; }
rows=()
for shape in sd15 sd21 sdxl; do
    fixture="$FIXTURES/$shape"
    if [[ ! -f $fixture/model_index.json ]]; then
        check "$shape fixture" skip "skipped: no pipeline in $fixture"
        continue
    fi
    ok=1
    for dev in "$DEVICE" cpu; do
        image_workflow "$STEP_DIR/img-$shape-$dev.toml" "$fixture" "$dev" "$(dtype_on "$dev")" 4
        if ! run_once "$STEP_DIR/img-$shape-$dev.toml" "$STEP_DIR/img-$shape-$dev" >/dev/null 2>"$STEP_DIR/img-$shape-$dev.err"; then
            check "$shape on $dev" fail "$(tail -1 "$STEP_DIR/img-$shape-$dev.err")"
            ok=0
            break
        fi
    done
    ((ok)) || continue
    d="$("$HOSTPY" "$GPU_DIR/png_diff.py" "$STEP_DIR/img-$shape-$DEVICE/cat.png" "$STEP_DIR/img-$shape-cpu/cat.png")"
    check "$shape runs" pass "4 steps on $DEVICE ($(dtype_on "$DEVICE")) and on the CPU (f32)"
    figure "$shape largest pixel difference" "$d" "of 255" "$DEVICE $(dtype_on "$DEVICE") vs cpu f32, one channel of one pixel"
    rows+=("| $shape (diffusers-written tiny pipeline, 4 steps) | $d of 255 |")
done
md "| pipeline | largest difference, $DEVICE $(dtype_on "$DEVICE") vs CPU f32 |" "| --- | --- |"
((${#rows[@]})) && md "${rows[@]}"

log "synthetic SD 1.5 pipeline of $IMG_SIZE (f16): $IMG_STEPS steps at ${IMG_WIDTH}x$IMG_HEIGHT"
dir="$(model sd15 sd15 "$IMG_SIZE" f16)" || exit 1
image_workflow "$STEP_DIR/synth.toml" "$dir" "$DEVICE" "$(dtype_on "$DEVICE")" "$IMG_STEPS" "$IMG_WIDTH" "$IMG_HEIGHT"
run_once "$STEP_DIR/synth.toml" "$STEP_DIR/synth-cold" >/dev/null || die "the synthetic pipeline's cold run failed"
timed iw "$STEP_DIR/synth.toml"
timed inc "$STEP_DIR/synth.toml" --no-cache
mkdir -p "$WORK/figures"
echo "$iw_wall $inc_wall" >"$WORK/figures/sd15-walls"
figure "SD 1.5 warm wall" "$iw_wall" ms "$(synth_line sd15 | sed 's/^wrote [^:]*: //'), $IMG_STEPS steps at ${IMG_WIDTH}x$IMG_HEIGHT, median of $RUNS"
figure "SD 1.5 --no-cache wall" "$inc_wall" ms ""
md "" "Synthetic SD 1.5 shapes ($IMG_SIZE f16), $IMG_STEPS steps at ${IMG_WIDTH}x$IMG_HEIGHT on $DEVICE: warm wall $iw_wall ms, --no-cache wall $inc_wall ms ($(ratio "$iw_wall" "$inc_wall")x)."
