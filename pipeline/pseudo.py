"""Pseudo-label bookkeeping shared by the MaskDistill stages (no model code).

Pseudo-label maps hold 0 = background (or, in scene-centric mode, unassigned) and 1..K =
pseudo-class (cluster id + 1). `training_target` turns them into segmenter targets.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

IGNORE = 255


def paste_cluster_masks(masks: Sequence[np.ndarray], labels: Sequence[int], scores: Sequence[float], hw: tuple[int, int]) -> np.ndarray:
    """Label map from one image's mined masks and their cluster ids (highest score on top)."""
    out = np.zeros(hw, dtype=np.uint16)
    for j in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[::-1]:
        out[np.asarray(masks[j], dtype=bool)] = int(labels[j]) + 1
    return out


def segmenter_classes(num_clusters: int, scene_centric: bool) -> int:
    """Classes of the final segmenter: K pseudo-classes, plus background when object-centric."""
    return num_clusters if scene_centric else num_clusters + 1


def training_target(pseudo: np.ndarray, scene_centric: bool) -> np.ndarray:
    """Segmenter target: object-centric keeps 0..K; scene-centric maps 1..K -> 0..K-1, 0 -> ignore."""
    if not scene_centric:
        return pseudo.astype(np.uint8)
    t = pseudo.astype(np.int64) - 1
    return np.where(t < 0, IGNORE, t).astype(np.uint8)
