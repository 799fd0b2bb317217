#!/usr/bin/env bash
# Set up, then run the default pipeline (dvc repro) on the embedded synthetic dataset and print the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
dvc repro "$@"
dvc metrics show
