#!/usr/bin/env bash
# Create the project's virtual environment in .venv and install Liver Node into it, plus the
# Node.js SEG reader used by the tests when npm is available.
# Usage: scripts/setup.sh   (idempotent; set PYTHON to choose the interpreter, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi

# torch is pinned to 2.13.0 and installed first, so that no other package pulls another build.
# These machines offer its CPU build to pip; elsewhere, install PyTorch's CPU build of 2.13.0
# into .venv before running this script, or pip takes the default (CUDA) build.
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"

if command -v npm >/dev/null 2>&1; then
    (cd tests/seg_reader && npm ci --silent --no-audit --no-fund)
else
    echo "npm not found: the dcmjs SEG reader test will be skipped" >&2
fi
