"""Supervised reference for the final segmenter: DeepLabv3-MobileNetV2 trained on the train GT.

The `probe` stage is the supervised reference for the frozen DINOv2 tokens; this is the same
for MaskDistill's final segmenter. It trains `segment`'s DeepLabv3 with `segment`'s params
(crop size, OHEM, SGD + poly, seed), but on the train split's ground truth instead of
pseudo-labels, then predicts the eval split at original size and prints per-class IoU and
mIoU (class ids as they are: no matching, it was trained on the classes). A diagnostic of
what the final segmenter can reach at these CPU sizes, never used to choose anything.

    python bench/segmenter_ceiling.py [--params params.yaml] [--index artifacts/index.h5] \
        [--weights models/weights] [--epochs N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("USEG_QUIET", "1")

from pipeline import runtime  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.index import read_index  # noqa: E402
from pipeline.metrics import confusion_matrix, identity_match  # noqa: E402
from pipeline.segmenter import predict_segmenter, train_segmenter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--index", default="artifacts/index.h5")
    ap.add_argument("--weights", default="models/weights", help="folder with mobilenet_v2_imagenet.pt")
    ap.add_argument("--epochs", type=int, default=0, help="training epochs; 0 = segment.epochs")
    args = ap.parse_args()
    params = load_params(args.params)
    device = runtime.setup(params.base)
    index = read_index(Path(args.index))
    ds = index.dataset
    if ds.num_classes < 2:
        raise SystemExit(f"error: {args.index}: the dataset has no labels; a supervised reference needs GT")
    cfg = dataclasses.replace(params.segment, seed=params.base.seed)
    if args.epochs:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    train = index.positions(params.base.train_split)
    evals = index.positions(params.base.eval_split)
    c = ds.num_classes
    t0 = time.perf_counter()
    model = train_segmenter(
        lambda j: ds.load_image(ds.samples[int(train[j])]),
        lambda j: np.array(ds.load_mask(ds.samples[int(train[j])])),  # writable copy
        c, cfg, backbone_weights=Path(args.weights) / "mobilenet_v2_imagenet.pt", device=device,
        num_images=len(train),
    )
    t_train = time.perf_counter() - t0
    conf = np.zeros((c, c), dtype=np.int64)
    with torch.inference_mode():
        for i in evals:
            sample = ds.samples[int(i)]
            pred = predict_segmenter(model, ds.load_image(sample), device=device).argmax(0)
            conf += confusion_matrix(pred, ds.load_mask(sample), c, c)
    result = identity_match(conf)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"dataset {ds.name}: {len(train)} train / {len(evals)} eval images, {c} classes; "
          f"epochs {cfg.epochs}, crop {cfg.crop_size}, batch {cfg.batch_size}, seed {cfg.seed}; train {t_train:.0f} s")
    for k, name in enumerate(ds.class_names):
        print(f"  {name:>16s}: {result.per_class_iou[k]:5.1f}")
    print(f"supervised DeepLabv3-MobileNetV2 (train GT) eval mIoU: {result.miou:.1f}")


if __name__ == "__main__":
    main()
