"""Segmentation losses: cross-entropy with online hard example mining (OHEM).

MaskDistill trains its final segmenter with `CrossEntropyOHEM(threshold=0.2)`: per-pixel
cross-entropy (ignore 255), then the mean over the hardest pixels only. The official code
takes `int(0.2 * all pixels of the batch)` pixels, ignored ones included in that count,
capped at the number of non-ignored pixels, and picks them over the whole batch (not per
image). `relative_to="all"` (the default) reproduces that; `relative_to="valid"` takes
20% of the non-ignored pixels instead. Both are the same when nothing is ignored.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


def ohem_count(num_pixels: int, num_valid: int, top_fraction: float, relative_to: Literal["all", "valid"]) -> int:
    """How many of the hardest pixels OHEM keeps (at least 1 when any pixel is valid)."""
    base = num_pixels if relative_to == "all" else num_valid
    return min(max(int(top_fraction * base), 1), num_valid)


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    top_fraction: float = 0.2,
    relative_to: Literal["all", "valid"] = "all",
) -> torch.Tensor:
    """Mean cross-entropy over the hardest `top_fraction` of the pixels of a batch.

    Args:
        logits: (B, C, H, W) unnormalised class scores.
        target: (B, H, W) integer class ids; `ignore_index` pixels never count.
        ignore_index: The void label.
        top_fraction: Fraction of pixels kept, in (0, 1]; 1 gives plain cross-entropy.
        relative_to: "all" (official MaskDistill: fraction of every pixel, capped at the
            number of valid ones) or "valid" (fraction of the non-ignored pixels).

    Returns:
        A scalar; 0 (still attached to the graph) when every pixel is ignored.

    Raises:
        ValueError: Bad shapes or a fraction outside (0, 1].
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits (B, C, H, W) and target (B, H, W) expected, got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    target = target.long()
    losses = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    valid = losses[target != ignore_index]
    if valid.numel() == 0:
        return logits.sum() * 0.0
    k = ohem_count(losses.numel(), valid.numel(), top_fraction, relative_to)
    return torch.topk(valid, k, sorted=False).values.mean()
