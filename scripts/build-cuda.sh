#!/usr/bin/env bash
# Builds release binaries of mora-cache and mora-exec with the `cuda` feature
# on a machine with no CUDA toolkit and no GPU (nvcc, headers and link
# libraries come from PyPI wheels: scripts/cuda-toolkit.sh), strips them and
# prints their sizes. The binaries run on a machine with an NVIDIA driver for
# CUDA 13.0 or newer and cuBLAS, cuRAND and NVRTC 13 on LD_LIBRARY_PATH
# (docs/cuda.md).
#
# Also builds the Python package's wheel (python/; it needs no CUDA at build
# time, it opens IPC handles through the driver with ctypes) into OUT_DIR, for
# scripts/gpu-check.sh.
#
# Usage: scripts/build-cuda.sh [OUT_DIR]   (default: target/cuda/dist)
# Environment: CUDA_COMPUTE_CAP (default 90: H100, H200), MORA_CUDA_PREFIX,
#              JOBS (cargo -j, default: all cores).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case "${1:-}" in
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
OUT="${1:-$ROOT/target/cuda/dist}"
PREFIX="${MORA_CUDA_PREFIX:-$ROOT/.mora-cuda}"

scripts/cuda-toolkit.sh link >&2
# shellcheck source=/dev/null
source "$PREFIX/env-link.sh"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

# A target directory of its own, so the CPU build's binaries stay as they are.
echo "build-cuda: cargo build --release --features cuda (compute capability $CUDA_COMPUTE_CAP)" >&2
cargo build --locked --release ${JOBS:+-j "$JOBS"} --target-dir target/cuda \
    -p mora-cache -p mora-exec --features mora-cache/cuda,mora-exec/cuda

mkdir -p "$OUT"
for bin in mora-cache mora-exec; do
    cp "target/cuda/release/$bin" "$OUT/$bin.unstripped"
    strip -o "$OUT/$bin" "$OUT/$bin.unstripped"
    rm "$OUT/$bin.unstripped"
done
echo "build-cuda: binaries in $OUT (stripped):" >&2
for bin in mora-cache mora-exec; do
    printf '  %-10s %6.1f MiB  needs: %s\n' "$bin" "$(awk -v b="$(stat -c %s "$OUT/$bin")" 'BEGIN { print b / 1048576 }')" \
        "$(readelf -d "$OUT/$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | grep -E 'cuda|cublas|curand|nvrtc' | tr '\n' ' ')"
done

echo "build-cuda: the Python package's wheel (pip wheel ./python)" >&2
rm -f "$OUT"/mora-*.whl
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$OUT" ./python >&2
ls "$OUT"/mora-*.whl >&2
