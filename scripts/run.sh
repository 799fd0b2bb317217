#!/usr/bin/env bash
# Set up, then run the default pipeline (dvc repro) on the embedded synthetic dataset and print the eval-split mIoU of every method.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
dvc repro "$@"
# the eval-split metrics, one line per method (`dvc metrics show` has every key, ~50 columns)
python - <<'PY'
import json
m = json.load(open("results/evaluate/metrics.json"))
print(f"{'predictor':14s} {'method':22s} {'K':>3s} {'matching':18s} {'mIoU':>6s} {'pixel acc':>9s}")
for predictor, methods in m.items():
    for method, r in methods.items():
        print(f"{predictor:14s} {method:22s} {r['k']:3d} {r['matching']:18s} {r['miou']:6.1f} {r['pixel_accuracy']:9.1f}")
p = json.load(open("results/probe/metrics.json"))["probe"]
print(f"{'probe':14s} {'linear (uses train GT)':22s} {'':3s} {'none':18s} {p['miou']:6.1f} {p['pixel_accuracy']:9.1f}")
PY
