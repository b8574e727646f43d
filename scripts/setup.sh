#!/usr/bin/env bash
# Create the project's virtual environment in .venv and install Liver Node into it.
# Usage: scripts/setup.sh   (idempotent; set PYTHON to choose the interpreter, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi

# torch is pinned to the CPU build; installing it first keeps pip from pulling a CUDA build.
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
