"""Benchmark: forward FLOPs of the final DeepLabv3-MobileNetV2 at output stride 16 and 8.

Counts the floating-point operations of one forward pass (torch.utils.flop_counter, random
init, batch 1) at each image size given, for both strides, and prints the ratio 8 / 16. FLOPs
do not depend on the machine; wall time does (see the README for the measured segment times).

    python bench/segment_flops.py [--classes 11] [--size 224x224 --size 364x476]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.segmenter import build_deeplab


def forward_flops(output_stride: int, classes: int, size: tuple[int, int]) -> int:
    model = build_deeplab(classes, None, output_stride).eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, *size))
    return counter.get_total_flops()


def image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HxW, e.g. 224x224") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"size {text!r}: each side must be at least 32 px")
    return h, w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=11, help="output classes of the head")
    ap.add_argument("--size", type=image_size, action="append", default=None,
                    help="HxW, repeatable (default 224x224 and 364x476)")
    args = ap.parse_args()
    for h, w in args.size or [(224, 224), (364, 476)]:
        f16 = forward_flops(16, args.classes, (h, w))
        f8 = forward_flops(8, args.classes, (h, w))
        print(f"{h}x{w}: output stride 16 {f16 / 1e9:.2f} GFLOP, 8 {f8 / 1e9:.2f} GFLOP, ratio {f8 / f16:.2f}")


if __name__ == "__main__":
    main()
