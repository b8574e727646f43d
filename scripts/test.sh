#!/usr/bin/env bash
# Set up the environment and run the whole test suite.
# PostgreSQL tests need Debian's postgresql package (installed by .ci/run); without it they skip.
# Usage: scripts/test.sh [PYTEST_ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -rA --durations=15 "$@"
