#!/usr/bin/env bash
# Step `peers-text`: sentence-transformers (else transformers with mean
# pooling) on $DEVICE with the embedding model, a process per run and one
# persistent process, against Mora warm and --no-cache (from the figures step
# when it ran, else measured here); and its embeddings against Mora's.
# shellcheck source=scripts/gpu/lib.sh disable=SC2154 # NAME_wall and the like are set by `timed`
source "$GPU_DIR/lib.sh"

if ! why="$(torch_ok sentence_transformers)" && ! torch_ok transformers >/dev/null; then
    skip_step "$why"
fi
embed_model
daemon_start main
embed_workflow "$STEP_DIR/dev.toml" "$EMBED_LINE" "$DEVICE" "$TEXTS"
run_once "$STEP_DIR/dev.toml" "$STEP_DIR/out-mora" >/dev/null || die "Mora's run on $DEVICE failed"
if read -r mw_wall mn_wall 2>/dev/null <"$WORK/figures/embed-walls"; then
    mora_from="the figures step"
else
    timed mw "$STEP_DIR/dev.toml"
    timed mn "$STEP_DIR/dev.toml" --no-cache
    mora_from="this step"
fi

log "a process per run, $RUNS runs"
walls=()
for i in $(seq "$RUNS"); do
    t0="$(now_ms)"
    "$PY" "$GPU_DIR/text_peer.py" once "$EMBED_SRC" "$DEVICE" "$TEXTS_JSON" "$STEP_DIR/peer-$i.json" >"$STEP_DIR/peer-$i.log" 2>&1 \
        || die "text_peer.py once failed: $(tail -1 "$STEP_DIR/peer-$i.log")"
    walls+=($(($(now_ms) - t0)))
done
once_wall="$(printf '%s\n' "${walls[@]}" | median)"
log "one persistent process, $RUNS requests"
"$PY" "$GPU_DIR/text_peer.py" persistent "$EMBED_SRC" "$DEVICE" "$TEXTS_JSON" "$RUNS" "$STEP_DIR/persistent.json" >"$STEP_DIR/persistent.log" 2>&1 \
    || die "text_peer.py persistent failed: $(tail -1 "$STEP_DIR/persistent.log")"
p="$STEP_DIR/persistent.json"
peer="$(json_get "$p" 'd["peer"]')"
request="$(json_get "$p" 'sorted(d["request_ms"])[len(d["request_ms"]) // 2]')"
request="$(printf '%.1f' "$request")"
diff="$(max_abs_diff "$STEP_DIR/peer-1.json" "$STEP_DIR/out-mora/embeddings.json")"
check "$peer = Mora on $DEVICE" "$(pass_if "$diff" '<=' 1e-3)" "max |difference| per component $diff (limit 1e-3), 8 texts"
figure "$peer, a process per run" "$once_wall" ms "wall: import, load, embed 8 texts, write, exit; median of $RUNS"
figure "$peer, persistent, per request" "$request" ms "load $(printf '%.0f' "$(json_get "$p" 'd["load_ms"]')") ms once"
figure "Mora warm wall" "$mw_wall" ms "from $mora_from"
figure "Mora --no-cache wall" "$mn_wall" ms "from $mora_from"
md "Model: $EMBED_NAME, f32 on $DEVICE, 8 texts a run; ms, medians of $RUNS (Mora's from $mora_from)."
md "" "| contender | ms a run |" "| --- | --- |"
md "| Mora warm (a fresh process, weights lent) | $mw_wall |"
md "| Mora --no-cache (a fresh process, weights read) | $mn_wall |"
md "| $peer, a fresh process (import, load, embed) | $once_wall |"
md "| $peer, persistent process (embed only) | $request |"
