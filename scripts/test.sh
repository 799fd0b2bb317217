#!/usr/bin/env bash
# Set up, then run the whole test suite (slow tests included: real weights conversion, real data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
python -m pytest -q "$@"
