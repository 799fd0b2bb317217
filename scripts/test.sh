#!/usr/bin/env bash
# Set up, then run the whole test suite (slow tests included: real weights conversion, real data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
# two workers, one test file each at a time (module fixtures stay in one process), in the order
# set by tests/conftest.py: the end-to-end DVC test starts first and runs beside all the rest
python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
