#!/usr/bin/env bash
# Installs a CUDA 13.0 toolkit subset from PyPI wheels (the only network
# access is the package registry, through pip), enough to build Rust crates
# that use candle-core's "cuda" feature on a machine with no CUDA toolkit and
# no GPU:
#
#   compile  nvcc, ptxas, cicc (nvvm), the CUDA/CCCL/crt headers and cudart:
#            what `cargo check` and `cargo build` need up to the final link
#            (cudarc runs `nvcc --version` to pick its bindings; candle-kernels
#            runs nvcc to make PTX and a static library of kernels).
#   link     compile + cuBLAS, cuBLASLt, cuRAND, NVRTC, unversioned .so links
#            and a stub libcuda.so (the driver is not on PyPI): what the final
#            link of a binary needs (-lcuda -lnvrtc -lcurand -lcublas
#            -lcublasLt -lcudart). The stub only satisfies the linker; the
#            binary records NEEDED libcuda.so.1 and loads the real driver's
#            library at run time.
#
# CUDA 13.0 exactly, because the GPU machines run driver 580 (CUDA 13.0) and
# PTX made by a newer nvcc would not load there. Every wheel is pinned by
# version and sha256.
#
# Layout under PREFIX (default <repo>/.mora-cuda, or $MORA_CUDA_PREFIX):
#   wheels/               downloaded wheels (cache; drop them here to go offline)
#   cuda/{bin,include,lib,nvvm}   a CUDA_ROOT-like tree (lib64 -> lib)
#   cuda/lib/stubs/libcuda.so     link-only driver stub (link mode)
#   env-compile.sh, env-link.sh   environment for each mode, to `source`
#   env.sh                the env of the most complete mode installed
#   .stamp-compile, .stamp-link   what was installed; a re-run with the same
#                         pins only checks nvcc and rewrites the env files
#
# Run `scripts/cuda-toolkit.sh --help` for usage.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ME="cuda-toolkit"
PYTHON="${PYTHON:-python3}"
CUDA_RELEASE="13.0"
STAMP_FORMAT="1"   # bump when the layout this script makes changes

# name version filename sha256 size: the wheels of CUDA 13.0 (Update 1/2).
COMPILE_WHEELS=(
    "nvidia-cuda-nvcc 13.0.88 nvidia_cuda_nvcc-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03 37384532"
    "nvidia-cuda-runtime 13.0.96 nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548 2243632"
    "nvidia-cuda-cccl 13.0.85 nvidia_cuda_cccl-13.0.85-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649 3120526"
    "nvidia-nvvm 13.0.88 nvidia_nvvm-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0 61601415"
    "nvidia-cuda-crt 13.0.88 nvidia_cuda_crt-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4 134086"
)
LINK_WHEELS=(
    "nvidia-cublas 13.0.2.14 nvidia_cublas-13.0.2.14-py3-none-manylinux_2_27_x86_64.whl 0cf238ffdbe46c00cb9aa98e7bca745c223a5ca5a53e686ac8b3e5a08fe80d6c 420882912"
    "nvidia-curand 10.4.0.35 nvidia_curand-10.4.0.35-py3-none-manylinux_2_27_x86_64.whl 1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc 59544258"
    "nvidia-cuda-nvrtc 13.0.88 nvidia_cuda_nvrtc-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575 90215200"
)

usage() {
    cat <<EOF
Usage: scripts/cuda-toolkit.sh MODE [--print-env] [--prefix DIR] [--force]

Installs CUDA ${CUDA_RELEASE} from pinned PyPI wheels (sha256-checked) so that
crates using candle-core's "cuda" feature build without a system toolkit or GPU.

Modes:
  compile   nvcc + headers (~100 MiB download): enough for \`cargo check\` and
            for \`cargo build\` up to, not including, the final link.
  link      compile + cuBLAS/cuBLASLt, cuRAND, NVRTC and a stub libcuda.so
            (~645 MiB download in all): enough to link binaries.

Options:
  --print-env   after installing, print the MODE's environment on stdout as
                export lines, for: eval "\$(scripts/cuda-toolkit.sh link --print-env)"
  --prefix DIR  install under DIR (default: \$MORA_CUDA_PREFIX, else
                <repo>/.mora-cuda)
  --force       re-extract and rebuild even if the stamp says it is done
                (downloaded wheels are reused when their sha256 matches)
  -h, --help    this text

Outputs: PREFIX/env-compile.sh and PREFIX/env-link.sh (and PREFIX/env.sh, the
most complete mode installed) define CUDA_ROOT, CUDA_PATH, CUDA_HOME, PATH and
CUDA_COMPUTE_CAP (default 90 = H100/H200; an already set value wins); the link
env also sets LIBRARY_PATH (cuda/lib, cuda/lib/stubs) and LD_LIBRARY_PATH
(cuda/lib, which holds no libcuda.so.1, so the real driver is used at run time).

  scripts/cuda-toolkit.sh link && . .mora-cuda/env.sh && cargo build --release

Progress goes to stderr, one line per step. Needs python3 with pip and, in
link mode, a C compiler (cc). Environment: MORA_CUDA_PREFIX, PYTHON
(default python3), the usual PIP_* settings (e.g. PIP_INDEX_URL).
EOF
}

log() { printf '%s: %s\n' "$ME" "$*" >&2; }
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }

MODE=""
PRINT_ENV=0
FORCE=0
PREFIX="${MORA_CUDA_PREFIX:-$ROOT/.mora-cuda}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        compile|link) [[ -z "$MODE" ]] || die "only one mode may be given"; MODE="$1" ;;
        --print-env) PRINT_ENV=1 ;;
        --force) FORCE=1 ;;
        --prefix) [[ $# -ge 2 ]] || die "--prefix needs a directory"; PREFIX="$2"; shift ;;
        --prefix=*) PREFIX="${1#--prefix=}" ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
[[ -n "$MODE" ]] || { usage >&2; die "a mode is needed: compile or link"; }
[[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] || die "only x86-64 Linux is supported (this is $(uname -s)/$(uname -m))"

mkdir -p "$PREFIX"
PREFIX="$(cd "$PREFIX" && pwd)"
CUDA="$PREFIX/cuda"
CACHE="$PREFIX/wheels"
START=$SECONDS

# One run at a time per prefix (several builds may call this concurrently).
if command -v flock >/dev/null; then
    exec 9>"$PREFIX/.lock"
    flock 9
fi

sha256_of() {
    if command -v sha256sum >/dev/null; then
        sha256sum "$1" | cut -d' ' -f1
    else
        "$PYTHON" -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"
    fi
}

# The stamp's content: everything that decides what a mode installs.
stamp_text() { # mode wheels...
    printf 'format %s mode %s\n' "$STAMP_FORMAT" "$1"; shift
    printf '%s\n' "$@"
}

# Downloads (through pip, --require-hashes) the wheels of a set not already in
# the cache with the right sha256, then checks every file's sha256 itself.
fetch_wheels() { # wheels...
    local line name version file sha size missing=() req
    for line in "$@"; do
        read -r name version file sha size <<<"$line"
        if [[ -f "$CACHE/$file" && "$(sha256_of "$CACHE/$file")" == "$sha" ]]; then
            log "cached $name==$version"
        else
            rm -f "$CACHE/$file"
            missing+=("$line")
        fi
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        "$PYTHON" -m pip --version >/dev/null 2>&1 \
            || die "pip is missing: '$PYTHON -m pip' does not run (install python3-pip, or set PYTHON)"
        mkdir -p "$CACHE"
        req="$CACHE/requirements.$$.txt"
        : >"$req"
        local total=0
        for line in "${missing[@]}"; do
            read -r name version file sha size <<<"$line"
            printf '%s==%s --hash=sha256:%s\n' "$name" "$version" "$sha" >>"$req"
            total=$((total + size))
        done
        log "downloading ${#missing[@]} wheel(s), $((total / 1048576)) MiB, from the package index"
        # --platform makes the choice independent of this machine's glibc and
        # Python (the wheels are py3-none and are unpacked, not installed).
        if ! "$PYTHON" -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
                --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
                --platform manylinux2010_x86_64 \
                -r "$req" -d "$CACHE" >"$CACHE/pip.log" 2>&1; then
            rm -f "$req"
            if grep -q 'DO NOT MATCH THE HASHES' "$CACHE/pip.log"; then
                die "checksum mismatch for a downloaded wheel: $(grep -m1 -E '^ *nvidia' "$CACHE/pip.log" | sed 's/^ *//;s/ from .*//') (see $CACHE/pip.log)"
            fi
            die "pip download failed: $(grep -m1 -E 'ERROR' "$CACHE/pip.log" || tail -n1 "$CACHE/pip.log") (see $CACHE/pip.log)"
        fi
        rm -f "$req"
    fi
    for line in "$@"; do
        read -r name version file sha size <<<"$line"
        [[ -f "$CACHE/$file" ]] || die "pip did not produce $file"
        [[ "$(sha256_of "$CACHE/$file")" == "$sha" ]] \
            || die "checksum mismatch: $file does not have sha256 $sha"
    done
}

# Unpacks nvidia/cu13/* of each wheel into $CUDA (the wheels of one CUDA
# release share that tree: bin/, include/, lib/, nvvm/), keeping the
# executable bits recorded in the wheel.
extract_wheels() { # wheels...
    local line name version file sha size files=()
    for line in "$@"; do
        read -r name version file sha size <<<"$line"
        files+=("$CACHE/$file")
    done
    log "unpacking ${#files[@]} wheel(s) into $CUDA"
    mkdir -p "$CUDA"
    "$PYTHON" - "$CUDA" "${files[@]}" <<'EOF'
import os, shutil, sys, zipfile
dest, wheels, top = sys.argv[1], sys.argv[2:], "nvidia/cu13/"
for whl in wheels:
    count = 0
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            name = info.filename
            if not name.startswith(top) or name.endswith("/"):
                continue
            rel = os.path.normpath(name[len(top):])
            if rel.startswith("..") or os.path.isabs(rel) or rel.startswith(".metadata"):
                continue
            out = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            part = out + ".part"
            with z.open(info) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(part, mode or 0o644)
            os.replace(part, out)
            count += 1
    if count == 0:
        sys.exit(f"cuda-toolkit: error: {os.path.basename(whl)} has no {top} files")
EOF
}

check_nvcc() {
    local out
    out="$("$CUDA/bin/nvcc" --version 2>&1)" \
        || die "$CUDA/bin/nvcc --version failed (re-run with --force): $(tail -n1 <<<"$out")"
    grep -q "release $CUDA_RELEASE," <<<"$out" \
        || die "$CUDA/bin/nvcc is not CUDA $CUDA_RELEASE: $(grep -m1 release <<<"$out")"
}

install_compile() {
    local stamp="$PREFIX/.stamp-compile"
    if [[ $FORCE -eq 0 && -f "$stamp" && "$(cat "$stamp")" == "$(stamp_text compile "${COMPILE_WHEELS[@]}")" ]]; then
        check_nvcc
        log "compile: already installed (nvcc $CUDA_RELEASE)"
        return
    fi
    rm -f "$stamp" "$PREFIX/.stamp-link"
    fetch_wheels "${COMPILE_WHEELS[@]}"
    extract_wheels "${COMPILE_WHEELS[@]}"
    # nvcc finds cicc through bin/nvcc.profile (../nvvm/bin); make sure every
    # tool is executable whatever the unpacker kept.
    chmod +x "$CUDA"/bin/* "$CUDA"/nvvm/bin/*
    [[ -e "$CUDA/lib64" ]] || ln -s lib "$CUDA/lib64"
    [[ -x "$CUDA/nvvm/bin/cicc" && -f "$CUDA/include/cuda.h" && -d "$CUDA/include/crt" ]] \
        || die "the unpacked tree lacks nvvm/bin/cicc, include/cuda.h or include/crt"
    check_nvcc
    if ! command -v "${NVCC_CCBIN:-g++}" >/dev/null; then
        log "warning: no ${NVCC_CCBIN:-g++} on PATH; nvcc needs a host C++ compiler"
    fi
    stamp_text compile "${COMPILE_WHEELS[@]}" >"$stamp"
    log "compile: installed nvcc $CUDA_RELEASE"
}

# A link-only libcuda.so: one function for every driver entry point that
# CUDA 13.0's cuda.h declares (seen through the preprocessor, so the names are
# the exported ones: cuMemAlloc_v2, cuCtxCreate_v4, ..._ptsz, ...), soname
# libcuda.so.1 like the real driver's. Nothing ever runs it: it sits in
# lib/stubs as libcuda.so only, never as libcuda.so.1, so the loader takes the
# driver's library.
make_libcuda_stub() {
    local cc="${CC:-cc}" tmp names
    command -v "$cc" >/dev/null || die "no C compiler ($cc) to build the libcuda stub"
    tmp="$(mktemp -d)"
    names="$tmp/names.txt"
    {
        for def in "" "-D__CUDA_API_VERSION_INTERNAL" "-DCUDA_API_PER_THREAD_DEFAULT_STREAM"; do
            # shellcheck disable=SC2086
            printf '#include <cuda.h>\n' | "$cc" -E -P $def -I"$CUDA/include" -x c - \
                || die "could not preprocess $CUDA/include/cuda.h"
        done
        # cudaProfiler.h (not in the wheels) declares these; libcuda exports them.
        printf 'CUresult cuProfilerInitialize(\nCUresult cuProfilerStart(\nCUresult cuProfilerStop(\n'
    } | grep -oE 'CUresult[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]*\(' \
      | sed -E 's/^CUresult[[:space:]]+//; s/[[:space:]]*\($//' | sort -u >"$names"
    [[ $(wc -l <"$names") -gt 400 ]] || die "found only $(wc -l <"$names") driver functions in cuda.h"
    {
        printf '/* Link-only stub of libcuda.so.1 made by scripts/cuda-toolkit.sh. */\n'
        sed -E 's/.*/int &(void) { return 999; \/* CUDA_ERROR_UNKNOWN *\/ }/' "$names"
    } >"$tmp/libcuda_stub.c"
    mkdir -p "$CUDA/lib/stubs"
    "$cc" -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$CUDA/lib/stubs/libcuda.so" "$tmp/libcuda_stub.c" \
        || die "could not compile the libcuda stub"
    log "made lib/stubs/libcuda.so (soname libcuda.so.1, $(wc -l <"$names") functions)"
    rm -rf "$tmp"
}

install_link() {
    local stamp="$PREFIX/.stamp-link"
    if [[ $FORCE -eq 0 && -f "$stamp" && "$(cat "$stamp")" == "$(stamp_text link "${LINK_WHEELS[@]}")" ]]; then
        log "link: already installed"
        return
    fi
    rm -f "$stamp"
    fetch_wheels "${LINK_WHEELS[@]}"
    extract_wheels "${LINK_WHEELS[@]}"
    # The wheels ship only versioned libraries (libcublas.so.13, ...); the
    # linker's -lcublas wants libcublas.so. Link each to its shortest
    # versioned name.
    local f base n=0
    while read -r f; do
        base="$CUDA/lib/${f%%.so.*}.so"
        if [[ ! -e "$base" && ! -L "$base" ]]; then
            ln -s "$f" "$base"
            n=$((n + 1))
        fi
    done < <(cd "$CUDA/lib" && for f in lib*.so.*; do [[ -f "$f" ]] && printf '%s\n' "$f"; done \
                | awk '{ print length($0), $0 }' | sort -n | cut -d' ' -f2)
    log "linked $n unversioned .so name(s) in lib/"
    local lib
    for lib in cudart nvrtc curand cublas cublasLt; do
        [[ -e "$CUDA/lib/lib$lib.so" ]] || die "lib/lib$lib.so is missing after unpacking"
    done
    make_libcuda_stub
    stamp_text link "${LINK_WHEELS[@]}" >"$stamp"
    log "link: installed"
}

write_env() { # mode
    local file="$PREFIX/env-$1.sh"
    {
        printf '# CUDA %s from PyPI wheels, %s mode; made by scripts/cuda-toolkit.sh\n' "$CUDA_RELEASE" "$1"
        printf "export CUDA_ROOT='%s'\n" "$CUDA"
        printf "export CUDA_PATH='%s'\n" "$CUDA"
        printf "export CUDA_HOME='%s'\n" "$CUDA"
        printf "export PATH='%s':\"\$PATH\"\n" "$CUDA/bin"
        # candle-kernels (cudaforge) asks nvidia-smi otherwise; 90 = H100/H200.
        printf 'export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"\n'
        if [[ "$1" == link ]]; then
            printf "export LIBRARY_PATH='%s:%s'\"\${LIBRARY_PATH:+:\$LIBRARY_PATH}\"\n" "$CUDA/lib" "$CUDA/lib/stubs"
            printf "export LD_LIBRARY_PATH='%s'\"\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\"\n" "$CUDA/lib"
        fi
    } >"$file.tmp"
    mv "$file.tmp" "$file"
}

install_compile
write_env compile
if [[ "$MODE" == link ]]; then
    install_link
fi
if [[ -f "$PREFIX/.stamp-link" ]]; then
    write_env link
    cp "$PREFIX/env-link.sh" "$PREFIX/env.sh"
else
    rm -f "$PREFIX/env-link.sh"
    cp "$PREFIX/env-compile.sh" "$PREFIX/env.sh"
fi
log "done in $((SECONDS - START))s; environment: . $PREFIX/env-$MODE.sh"
if [[ $PRINT_ENV -eq 1 ]]; then
    cat "$PREFIX/env-$MODE.sh"
fi
