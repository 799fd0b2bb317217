#!/usr/bin/env bash
# Set up, then run the whole test suite (slow tests included: real weights conversion, real data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
# two workers, one test file each at a time (module fixtures stay in one process): the
# end-to-end DVC test runs beside the rest instead of after it
python -m pytest -q -n 2 --dist loadfile "$@"
