#!/usr/bin/env bash
# Step `peers-image`: diffusers on $DEVICE (f16) with the synthetic SD 1.5
# pipeline of the images step, a process per image and one persistent process,
# against Mora warm and --no-cache on the same pipeline and settings (from the
# images step when it ran, else measured here). diffusers comes from $PY, else
# from the wheels in $WHEELS (the bundle carries them), unpacked offline.
# shellcheck source=scripts/gpu/lib.sh disable=SC2154 # NAME_wall and the like are set by `timed`
source "$GPU_DIR/lib.sh"

why="$(torch_ok)" || skip_step "$why"
peerlib=""
if ! "$PY" -c "import diffusers" 2>/dev/null; then
    # Each diffusers wheel carried (newest first) unpacked with the small
    # wheels beside it, until one imports over $PY's packages.
    mapfile -t diffusers < <(ls "$WHEELS"/diffusers-*.whl 2>/dev/null | sort -rV)
    others=()
    for w in "$WHEELS"/*.whl; do
        case "$(basename "$w")" in mora-*|diffusers-*) ;; *) [[ -f $w ]] && others+=("$w") ;; esac
    done
    ((${#diffusers[@]})) || skip_step "$PY has no diffusers and $WHEELS holds no wheel of it (scripts/gpu-bundle.sh carries them)"
    errors=""
    for w in "${diffusers[@]}"; do
        lib="$WORK/peerlib-$(basename "$w" .whl)"
        log "unpacking $(basename "$w") offline"
        if ! install_wheels "$lib" "$w" "${others[@]}"; then
            errors+="$(basename "$w"): $(tail -1 "$lib.log"); "
            continue
        fi
        if err="$(PYTHONPATH="$lib" "$PY" -c "from diffusers import StableDiffusionPipeline" 2>&1)"; then
            peerlib="$lib"
            break
        fi
        errors+="$(basename "$w"): $(printf '%s\n' "$err" | tail -1); "
    done
    [[ -n $peerlib ]] || skip_step "no diffusers wheel imports over $PY's packages: $errors"
fi
export PYTHONPATH="$peerlib${PYTHONPATH:+:$PYTHONPATH}"
version="$("$PY" -c "import diffusers; print(diffusers.__version__)" 2>/dev/null)"
dir="$(model sd15 sd15 "$IMG_SIZE" f16)" || exit 1
dtype=f16; [[ $DEVICE == cpu ]] && dtype=f32
if read -r iw_wall inc_wall 2>/dev/null <"$WORK/figures/sd15-walls"; then
    mora_from="the images step"
else
    daemon_start main
    image_workflow "$STEP_DIR/synth.toml" "$dir" "$DEVICE" "$dtype" "$IMG_STEPS" "$IMG_WIDTH" "$IMG_HEIGHT"
    run_once "$STEP_DIR/synth.toml" "$STEP_DIR/synth-cold" >/dev/null || die "Mora's cold run failed"
    timed iw "$STEP_DIR/synth.toml"
    timed inc "$STEP_DIR/synth.toml" --no-cache
    mora_from="this step"
fi

log "diffusers $version: a process per image, $RUNS images"
walls=()
for i in $(seq "$RUNS"); do
    t0="$(now_ms)"
    "$PY" "$GPU_DIR/image_peer.py" once "$dir" "$DEVICE" "$IMG_STEPS" "$IMG_WIDTH" "$IMG_HEIGHT" "$STEP_DIR/peer-$i.png" >"$STEP_DIR/peer-$i.log" 2>&1 \
        || die "image_peer.py once failed: $(tail -1 "$STEP_DIR/peer-$i.log")"
    walls+=($(($(now_ms) - t0)))
done
once_wall="$(printf '%s\n' "${walls[@]}" | median)"
log "diffusers: one persistent process, $RUNS images"
"$PY" "$GPU_DIR/image_peer.py" persistent "$dir" "$DEVICE" "$IMG_STEPS" "$IMG_WIDTH" "$IMG_HEIGHT" "$RUNS" "$STEP_DIR/persistent.json" >"$STEP_DIR/persistent.log" 2>&1 \
    || die "image_peer.py persistent failed: $(tail -1 "$STEP_DIR/persistent.log")"
p="$STEP_DIR/persistent.json"
per_image="$(printf '%.0f' "$(json_get "$p" 'sorted(d["image_ms"])[len(d["image_ms"]) // 2]')")"
scheduler="$(json_get "$p" 'd["scheduler"]')"
check "diffusers runs" pass "diffusers $version, $scheduler, on $DEVICE ($dtype)"
figure "diffusers, a process per image" "$once_wall" ms "wall: import, load, one image, exit; median of $RUNS"
figure "diffusers, persistent, per image" "$per_image" ms "load $(printf '%.0f' "$(json_get "$p" 'd["load_ms"]')") ms once"
figure "Mora warm wall" "$iw_wall" ms "from $mora_from"
figure "Mora --no-cache wall" "$inc_wall" ms "from $mora_from"
md "Pipeline: synthetic SD 1.5 shapes ($IMG_SIZE f16, held $dtype), $IMG_STEPS steps at ${IMG_WIDTH}x$IMG_HEIGHT with classifier-free guidance, on $DEVICE; ms, medians of $RUNS (Mora's from $mora_from; diffusers uses the pipeline's $scheduler, Mora its own scheduler)."
md "" "| contender | ms an image |" "| --- | --- |"
md "| Mora warm (a fresh process, weights lent) | $iw_wall |"
md "| Mora --no-cache (a fresh process, weights read) | $inc_wall |"
md "| diffusers $version, a fresh process (import, load, one image) | $once_wall |"
md "| diffusers $version, persistent process (one image) | $per_image |"
