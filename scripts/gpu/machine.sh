#!/usr/bin/env bash
# Step `machine`: what the machine really is, read at run time (nvidia-smi,
# nvcc, the nvidia-* lib folders of PyTorch's venv, the Python packages), and
# whether the binaries' libraries resolve.
# shellcheck source=scripts/gpu/lib.sh
source "$GPU_DIR/lib.sh"

if ((GPU)); then
    fact GPU "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader -i "$GPU_INDEX" 2>&1 | head -1)"
    fact driver "$(nvidia-smi --query-gpu=driver_version --format=csv,noheader -i "$GPU_INDEX" 2>&1 | head -1); CUDA (driver) $(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)"
    fact "GPUs seen" "$(nvidia-smi -L 2>/dev/null | wc -l)"
else
    fact GPU "none used (DEVICE=$DEVICE)"
fi
if command -v nvcc >/dev/null; then
    fact nvcc "$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -1)"
else
    fact nvcc "absent (not needed: the binaries carry PTX)"
fi
fact CPUs "$(nproc) ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1))"
fact memory "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
fact "scratch" "$WORK: $(df -PhT "$WORK" | awk 'NR == 2 { print $2 ", " $5 " free" }')"
fact "shared-memory huge pages" "$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null || echo unknown)"
fact binaries "$(for b in mora-cache mora-exec; do printf '%s %s MiB; ' "$b" "$(mib_of "$(stat -c %s "$BIN/$b")")"; done)$("$BIN/mora-exec" --version 2>/dev/null)"
versions="$("$PY" - <<'PY' 2>&1
import sys
from importlib import metadata
out = [f"python {sys.version.split()[0]}"]
for m in ("torch", "transformers", "sentence-transformers", "diffusers", "huggingface-hub", "safetensors", "numpy"):
    try:
        out.append(f"{m} {metadata.version(m)}")
    except metadata.PackageNotFoundError:
        out.append(f"{m} absent")
print("; ".join(out))
PY
)"
fact "python ($PY)" "$(printf '%s' "$versions" | tail -1)"
if ((GPU)); then
    fact "torch sees" "$("$PY" -c 'import torch; print(f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")' 2>&1 | tail -1)"
fi

# The CUDA 13 libraries in PyTorch's nvidia-* packages, which mora-exec loads.
if ((GPU)); then
    if [[ -n ${NVIDIA_LIB_DIRS:-} ]]; then
        found="$(IFS=:; for d in $NVIDIA_LIB_DIRS; do ls "$d"; done 2>/dev/null |
            grep -E '^lib(cudart|cublas|cublasLt|curand|nvrtc)\.so\.[0-9]+$' | sort -u | tr '\n' ' ')"
        fact "CUDA libraries (PyTorch's nvidia-* packages)" "${found:-none of cudart, cublas, curand, nvrtc}"
    else
        fact "CUDA libraries (PyTorch's nvidia-* packages)" "none: $PY has no nvidia package"
    fi
fi
missing=""
for b in mora-cache mora-exec; do
    m="$(ldd "$BIN/$b" 2>&1 | awk '/not found/ { print $1 }' | tr '\n' ' ')"
    [[ -n $m ]] && missing+="$b: $m"
done
if [[ -z $missing ]]; then
    check "libraries resolve" pass "ldd finds every library mora-cache and mora-exec need"
else
    check "libraries resolve" fail "not found: $missing"
fi
if "$BIN/mora-exec" --help >/dev/null 2>&1 && "$BIN/mora-cache" --help >/dev/null 2>&1; then
    check "binaries start" pass "mora-exec --help and mora-cache --help"
else
    check "binaries start" fail "$( { "$BIN/mora-exec" --help && "$BIN/mora-cache" --help; } 2>&1 >/dev/null | tail -1)"
fi
