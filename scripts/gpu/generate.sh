#!/usr/bin/env bash
# Step `generate`: a synthetic llama stored bf16, held bf16 on $DEVICE and f32
# on the CPU (the same weights). Greedy tokens of Mora on the device against
# the CPU, transformers' first-token logits from the daemon's weights on the
# device against f32 on the CPU, and tokens/s: Mora warm, Mora --no-cache,
# transformers' model.generate on the device.
# shellcheck source=scripts/gpu/lib.sh disable=SC2154 # NAME_wall and the like are set by `timed`
source "$GPU_DIR/lib.sh"

GEN_CHECK_TOKENS=16
dir="$(model gen llama "$GEN_SIZE" bf16)" || exit 1
shape="$(synth_line gen | sed -n 's/.*(\(.*\))/\1/p')"
daemon_start main
generate_workflow "$STEP_DIR/dev.toml" "$dir" "$DEVICE" bf16 "$GEN_CHECK_TOKENS"
generate_workflow "$STEP_DIR/cpu.toml" "$dir" cpu f32 "$GEN_CHECK_TOKENS"
generate_workflow "$STEP_DIR/dev-long.toml" "$dir" "$DEVICE" bf16 "$GEN_TOKENS"

log "llama $GEN_SIZE ($shape): $GEN_CHECK_TOKENS greedy tokens on $DEVICE (bf16) and on the CPU (f32)"
run_once "$STEP_DIR/dev.toml" "$STEP_DIR/out-dev" >/dev/null || die "the run on $DEVICE failed"
run_once "$STEP_DIR/cpu.toml" "$STEP_DIR/out-cpu" --no-cache >/dev/null || die "the CPU run failed"
ids_dev="$(json_get "$STEP_DIR/out-dev/gen.json" 'd["token_ids"]')"
ids_cpu="$(json_get "$STEP_DIR/out-cpu/gen.json" 'd["token_ids"]')"
[[ -n $ids_dev && -n $ids_cpu ]] || die "no token_ids in the outputs"
if [[ $ids_dev == "$ids_cpu" ]]; then
    check "greedy tokens, $DEVICE bf16 = CPU f32" pass "$GEN_CHECK_TOKENS tokens equal: $ids_dev"
else
    check "greedy tokens, $DEVICE bf16 = CPU f32" fail "$DEVICE: $ids_dev; CPU: $ids_cpu"
fi

log "tokens/s: $RUNS warm runs and $RUNS --no-cache runs of $GEN_TOKENS tokens on $DEVICE"
timed warm "$STEP_DIR/dev-long.toml"
timed nocache "$STEP_DIR/dev-long.toml" --no-cache
rates() { for i in $(seq "$RUNS"); do json_get "$STEP_DIR/out-$1-$i/gen.json" 'round(d["tokens_per_s"], 1)'; done | median; }
counts() { for i in $(seq "$RUNS"); do json_get "$STEP_DIR/out-$1-$i/gen.json" 'd["tokens"]'; done | sort -un | paste -sd, -; }
warm_rate="$(rates warm)"; nocache_rate="$(rates nocache)"
figure "Mora warm tokens/s" "$warm_rate" "tokens/s" "median of $RUNS processes, tokens: $(counts warm)"
figure "Mora warm wall" "$warm_wall" ms "process start to exit"
figure "Mora --no-cache tokens/s" "$nocache_rate" "tokens/s" "tokens: $(counts nocache)"
figure "Mora --no-cache wall" "$nocache_wall" ms ""

peer_rate="n/a"; peer_note=""
if why="$(torch_ok transformers)"; then
    pylib="$(mora_pylib)" || { pylib=""; peer_note=" (mora package not installed: the device model read the file)"; }
    log "transformers: first-token logits and model.generate on $DEVICE"
    if PYTHONPATH="$pylib${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$GPU_DIR/generate_peer.py" "$dir" "$DEVICE" \
        "the man is eating a piece of bread with the" "$GEN_CHECK_TOKENS" "$GEN_TOKENS" "$RUNS" "$STEP_DIR/peer.json" \
        >"$STEP_DIR/peer.out" 2>&1; then
        p="$STEP_DIR/peer.json"
        diff="$(json_get "$p" 'format(d["logits_max_abs_diff"], ".3g")')"
        scale="$(json_get "$p" 'format(d["logits_max_abs"], ".3g")')"
        figure "first-token logits max |difference|" "$diff" "" "transformers, $DEVICE bf16 ($(json_get "$p" 'd["weights"]')) vs CPU f32; largest |logit| $scale"
        check "first token, $DEVICE bf16 = CPU f32 (transformers)" "$([[ $(json_get "$p" 'd["argmax_equal"]') == True ]] && echo pass || echo fail)" \
            "argmax of the first-token logits; max |difference| $diff of logits up to $scale"
        hf_cpu="$(json_get "$p" 'd["cpu_ids"]')"
        if [[ $hf_cpu == "$ids_cpu" ]]; then
            check "Mora CPU f32 = transformers CPU f32" pass "$GEN_CHECK_TOKENS greedy tokens equal"
        else
            check "Mora CPU f32 = transformers CPU f32" fail "Mora $ids_cpu; transformers $hf_cpu"
        fi
        figure "transformers greedy tokens on $DEVICE bf16" "$(json_get "$p" 'd["device_ids"]')" "" "CPU f32: $hf_cpu; smallest top-1 margin on the CPU $(json_get "$p" 'd["cpu_min_margin"]') (near 0: a tie bf16 may break either way)"
        peer_rate="$(json_get "$p" 'sorted(d["tokens_per_s"])[len(d["tokens_per_s"]) // 2]')"
        figure "transformers tokens/s (persistent)" "$peer_rate" "tokens/s" "model.generate on $DEVICE bf16, median of $RUNS after a warm-up, tokens: $(json_get "$p" 'd["tokens"]')"
        [[ -n $(json_get "$p" 'd.get("state_dict_ms")') ]] && figure "mora.state_dict on $DEVICE" "$(json_get "$p" 'd["state_dict_ms"]')" ms "Python: the model's tensors lent on $DEVICE, resident already"
    else
        tail -5 "$STEP_DIR/peer.out" >&2
        check "transformers peer" fail "generate_peer.py failed: $(tail -1 "$STEP_DIR/peer.out")"
    fi
else
    check "transformers peer" skip "skipped: $why"
fi

md "Model: synthetic llama, $GEN_SIZE stored bf16 ($shape). Prompt of 11 words; $GEN_TOKENS tokens a run for the rates (fewer when the model emits its end token)."
md "" "| contender | tokens/s | wall ms |" "| --- | --- | --- |"
md "| Mora warm (a fresh process a run, weights lent by the daemon) | $warm_rate | $warm_wall |"
md "| Mora --no-cache (a fresh process a run, weights read in-process) | $nocache_rate | $nocache_wall |"
md "| transformers model.generate, persistent process$peer_note | $peer_rate | |"
