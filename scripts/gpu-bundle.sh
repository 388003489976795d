#!/usr/bin/env bash
# Lays out everything the GPU check needs on a GPU machine that has no Rust,
# no network and room for 64 MiB of transfer, in one folder with one entry
# point: the CUDA binaries (scripts/build-cuda.sh) stripped and compressed
# with xz, the Python package's wheel, the diffusers wheels the machine lacks
# (pip download --no-deps), scripts/gpu-check.sh with scripts/gpu/, and the
# tiny image pipelines of tests/fixtures. Models are not carried: the check
# makes them there (`mora-exec synth`). Prints the bundle's size and fails
# when it is over the limit.
#
# Usage: scripts/gpu-bundle.sh [--cpu [BIN_DIR]] [--no-peers] [-o DIR]
#   (default)      build the CUDA binaries and the wheel (scripts/build-cuda.sh)
#   --cpu [DIR]    the same layout from CPU binaries (default target/debug) and a
#                  dev build of the wheel: the rehearsal scripts/test.sh runs
#   --no-peers     no diffusers wheels (no PyPI access needed)
#   -o DIR         where (default target/gpu-bundle; emptied first)
# Environment: LIMIT_MIB (default 64), XZ_LEVEL (default 9; --cpu: 6), MORA_WHEEL
#   (--cpu: this wheel of the Python package instead of building one),
#   DIFFUSERS_VERSIONS (default "0.42.1 0.36.0": the newest, and one that takes
#   huggingface-hub from 0.34 on; the check uses the newest that imports there).
#
# On the GPU machine:  BUNDLE/run.sh   (OUT=DIR to keep the report, the JSON
# and the logs; any variable of scripts/gpu-check.sh --help passes through).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; }
MODE=cuda BIN="" PEERS=1 DEST="$ROOT/target/gpu-bundle"
while (($#)); do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --cpu) MODE=cpu; if [[ ${2:-} != "" && ${2:-} != -* ]]; then BIN="$2"; shift; fi ;;
        --no-peers) PEERS=0 ;;
        -o) DEST="${2:?-o needs a folder}"; shift ;;
        *) echo "gpu-bundle: unknown argument \`$1\` (see --help)" >&2; exit 2 ;;
    esac
    shift
done
LIMIT_MIB="${LIMIT_MIB:-64}"
DIFFUSERS_VERSIONS="${DIFFUSERS_VERSIONS:-0.42.1 0.36.0}"
log() { echo "gpu-bundle: $*" >&2; }

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/mora-gpu-bundle.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin" "$STAGE/wheels"
if [[ $MODE == cuda ]]; then
    XZ_LEVEL="${XZ_LEVEL:-9}"
    BIN="$ROOT/target/cuda/dist"
    scripts/build-cuda.sh "$BIN" >&2
    cp "$BIN"/mora-*.whl "$STAGE/wheels/"
    cp "$BIN/mora-cache" "$BIN/mora-exec" "$STAGE/bin/"
else
    XZ_LEVEL="${XZ_LEVEL:-6}"
    BIN="${BIN:-$ROOT/target/debug}"
    [[ -x $BIN/mora-cache && -x $BIN/mora-exec ]] || { log "no mora-cache and mora-exec in $BIN (cargo build --bins)"; exit 1; }
    for b in mora-cache mora-exec; do strip -o "$STAGE/bin/$b" "$BIN/$b"; done
    if [[ -n ${MORA_WHEEL:-} ]]; then
        cp "$MORA_WHEEL" "$STAGE/wheels/"
    else
        log "the Python package's wheel (pip wheel ./python, dev profile)"
        MATURIN_PEP517_ARGS="--profile dev" python3 -m pip wheel --quiet --disable-pip-version-check --no-deps \
            -w "$STAGE/wheels" ./python >&2
    fi
fi
log "compressing the binaries (xz -$XZ_LEVEL)"
for b in mora-cache mora-exec; do
    xz -T0 "-$XZ_LEVEL" "$STAGE/bin/$b"
done
if ((PEERS)); then
    log "peer wheels: diffusers $DIFFUSERS_VERSIONS, importlib-metadata, zipp (pip download --no-deps)"
    for v in $DIFFUSERS_VERSIONS; do
        python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            -d "$STAGE/wheels" "diffusers==$v" >&2
    done
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$STAGE/wheels" importlib-metadata zipp >&2
fi

mkdir -p "$STAGE/scripts/gpu" "$STAGE/tests/fixtures/image/pipelines"
cp scripts/gpu-check.sh "$STAGE/scripts/"
cp scripts/gpu/*.sh scripts/gpu/*.py "$STAGE/scripts/gpu/"
for shape in sd15 sd21 sdxl; do
    cp -r "tests/fixtures/image/pipelines/$shape" "$STAGE/tests/fixtures/image/pipelines/"
done
cat >"$STAGE/run.sh" <<'SH'
#!/usr/bin/env bash
# The GPU check from this bundle: unpacks the binaries next to it (xz, else
# Python's lzma), then runs scripts/gpu-check.sh on them with the wheels here.
# OUT=DIR keeps the report; scripts/gpu-check.sh --help lists the variables.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "${1:-}" in
    -h|--help) exec "$HERE/scripts/gpu-check.sh" --help ;;
esac
BIN="$(mktemp -d "${TMPDIR:-/tmp}/mora-bin.XXXXXX")"
trap 'rm -rf "$BIN"' EXIT
for b in mora-cache mora-exec; do
    if command -v xz >/dev/null; then
        xz -dc "$HERE/bin/$b.xz" >"$BIN/$b"
    else
        "$(command -v python3 || echo "${TORCH_PYTHON:-/opt/torch/.venv/bin/python3}")" \
            -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$HERE/bin/$b.xz" "$BIN/$b"
    fi || { echo "run.sh: cannot unpack $b" >&2; exit 2; }
    chmod +x "$BIN/$b"
done
echo "run.sh: bundle $(sed -n 's/^built: //p' "$HERE/BUILD")" >&2
WHEELS="${WHEELS:-$HERE/wheels}" "$HERE/scripts/gpu-check.sh" "$BIN"
SH
chmod +x "$STAGE/run.sh"
{
    echo "built: $(date -u +%Y-%m-%dT%H:%MZ) from $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo '+changes'), $MODE binaries"
    echo "files:"
    (cd "$STAGE" && find . -type f ! -name BUILD -printf '%P\n' | sort | xargs sha256sum)
} >"$STAGE/BUILD"

rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$STAGE" "$DEST"
trap - EXIT
bytes="$(du -sb "$DEST" | cut -f1)"
mib="$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')"
log "in $DEST:"
(cd "$DEST" && du -ab bin wheels scripts tests run.sh | sort -k2 | awk '$2 ~ /^(bin|wheels)\/|^(scripts|tests|run\.sh)$/ { printf "  %8.1f MiB  %s\n", $1 / 1048576, $2 }') >&2
echo "gpu-bundle: $mib MiB ($bytes bytes) in $DEST; limit $LIMIT_MIB MiB"
if ((bytes > LIMIT_MIB * 1048576)); then
    log "error: the bundle is over $LIMIT_MIB MiB"
    exit 1
fi
