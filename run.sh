#!/usr/bin/env bash
# Sets up what ffcv-dr needs (system packages, .venv, the package), then runs
#   ./run.sh test [pytest args]    the whole test suite
#   ./run.sh COMMAND [args]        any `ffcv-dr` command, e.g. quickstart
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=""
for pkg in pkg-config libturbojpeg0-dev libjpeg-dev libopencv-dev python3-venv python3-dev g++; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "installing system packages:$missing"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=".venv/.ffcv-dr-installed"
# Reinstalled when the package metadata or the C extensions change.
want="$(cat pyproject.toml setup.py ffcv_dr/_jpeg.c ffcv_dr/_restarts.c ffcv_dr/_jpeg_errors.h ffcv_dr/_resize.cpp | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up .venv (once, and again when the package changes): torch, FFCV, timm and ffcv-dr;"
    echo "  about 6 GB and a few minutes on a first run (FFCV and ffcv-dr build C extensions)"
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
    # A matched pair: timm pulls torchvision, and a mismatched pair fails to import.
    .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    .venv/bin/python -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
    echo "set up: run ffcv-dr as ./run.sh COMMAND, or .venv/bin/ffcv-dr, or ffcv-dr after: source .venv/bin/activate"
fi

if [ "${1:-}" = "test" ]; then
    shift
    exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/ffcv-dr "$@"
