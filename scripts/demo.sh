#!/usr/bin/env bash
# Set up the environment, then run the demo: start the node on embedded defaults, send a CT
# series to it over DICOM and print the volumes of the SEG and SR it sends back.
# Usage: scripts/demo.sh [CT_SERIES_FOLDER]   (no folder: a synthetic CT is generated)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/livernode demo "$@"
