"""The field's standard baseline: K-means on L2-normalised self-supervised patch tokens.

K-means (faiss) is fitted on patch tokens of the training split; every evaluation image
gets per-cluster cosine scores on its token grid, upsampled bilinearly to the original
image size, and the label is the arg-max cluster.
"""

from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F


def l2_normalize(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def fit_kmeans(x: np.ndarray, k: int, iters: int, seed: int, redo: int = 1, spherical: bool = True) -> np.ndarray:
    """faiss K-means; returns (k, d) float32 centroids (unit norm when `spherical`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < k:
        raise ValueError(f"K-means needs at least k={k} points, got {x.shape[0]}")
    km = faiss.Kmeans(
        x.shape[1], k, niter=iters, nredo=redo, seed=seed, spherical=spherical, verbose=False,
        max_points_per_centroid=max(256, x.shape[0] // k + 1),
    )
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32)


def sample_rows(n_items: int, per_item: int, max_rows: int, seed: int) -> np.ndarray:
    """A sorted random subset of flat row ids (item * per_item + j), at most `max_rows`."""
    total = n_items * per_item
    if total <= max_rows:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=max_rows, replace=False))


def score_map_labels(
    tokens: np.ndarray, centroids: np.ndarray, grid: Sequence[int], out_hw: Sequence[int]
) -> np.ndarray:
    """Label map at `out_hw` from bilinearly upsampled cosine scores to unit-norm centroids.

    Args:
        tokens: (P, D) patch tokens of one image (P = h * w, row-major).
        centroids: (K, D) unit-norm cluster centres.
        grid: (h, w) token grid.
        out_hw: (H, W) original image size.

    Returns:
        (H, W) int32 cluster ids.
    """
    t = torch.from_numpy(l2_normalize(tokens))
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    scores = (t @ c.T).T.reshape(1, c.shape[0], grid[0], grid[1])
    up = F.interpolate(scores, size=tuple(int(v) for v in out_hw), mode="bilinear", align_corners=False)
    return up[0].argmax(0).numpy().astype(np.int32)
