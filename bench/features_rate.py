"""Benchmark: the `features` stage's seconds per image against a bare forward pass.

Runs the same backbone, input size, batch size and precision (from params.yaml) (a) as bare
forward passes on a random batch, (b) as the real stage over the indexed dataset (decode,
resize, forward, float16 HDF5 write). Prints both rates and their ratio.

    python bench/features_rate.py [--params params.yaml] [--index artifacts/index.h5] [--images 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("USEG_QUIET", "1")

from pipeline import runtime  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from stages import features as stage  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--index", default="artifacts/index.h5")
    ap.add_argument("--repeats", type=int, default=3, help="bare forward batches timed")
    args = ap.parse_args()
    params = load_params(args.params)
    device = runtime.setup(params.base)
    cfg = params.features
    model = stage.load_backbone(params, device)
    x = torch.randn(cfg.batch_size, 3, *cfg.input_size, device=device)
    with torch.inference_mode(), runtime.autocast(params.base, device):
        model(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            model(x)
        bare = (time.perf_counter() - t0) / (args.repeats * cfg.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        loop = stage.run(params, Path(args.index), Path(tmp) / "features.h5")
        total = time.perf_counter() - t0
    from pipeline.index import read_index

    n = len(read_index(args.index).dataset.samples)
    per = loop / n
    print(f"machine: {platform.node()} {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"settings: {cfg.backbone} {cfg.input_size[0]}x{cfg.input_size[1]} batch {cfg.batch_size} {runtime.resolve_precision(params.base, device)} on {device}")
    print(f"bare forward: {bare:.4f} s/image ({1 / bare:.2f} images/s)")
    print(f"features stage loop ({n} images: decode, resize, forward, HDF5 write): {per:.4f} s/image ({1 / per:.2f} images/s)")
    print(f"features stage total incl. start-up (model load, index): {total:.1f} s = {total / n:.4f} s/image")
    print(f"stage loop rate / bare rate: {bare / per:.3f}; whole stage: {bare * n / total:.3f}")


if __name__ == "__main__":
    main()
