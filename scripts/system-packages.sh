#!/usr/bin/env bash
# Installs the Debian packages the build and tests need beyond a Rust
# toolchain, when they are missing: fontconfig and freetype headers (the
# benchmark chart draws its text with them, through plotters), a font, and
# Python's venv module (the Python package's tests run in a venv).
# Does nothing when everything is there; needs root or sudo otherwise.
set -euo pipefail
missing=()
pkg-config --exists fontconfig 2>/dev/null || missing+=(libfontconfig1-dev)
pkg-config --exists freetype2 2>/dev/null || missing+=(libfreetype-dev)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if ! { command -v fc-list >/dev/null 2>&1 && [[ -n "$(fc-list 2>/dev/null | head -1)" ]]; }; then
    missing+=(fonts-dejavu-core fontconfig)
fi
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || missing+=(python3-venv)
(( ${#missing[@]} == 0 )) && exit 0
echo "system-packages.sh: installing ${missing[*]}" >&2
SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo)
"${SUDO[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
