"""The trivial baseline: K-means on per-pixel colour and position.

Used to check that a dataset is not solvable by colour and layout alone (the synthetic
set must score low), and as the floor any unsupervised method has to beat.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import MiniBatchKMeans


def rgbxy_features(image: np.ndarray, xy_weight: float = 1.0) -> np.ndarray:
    """Per-pixel features (H*W, 5) float32: R, G, B in 0..1, then x/W and y/H times `xy_weight`."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = image.reshape(-1, 3).astype(np.float32) / 255.0
    return np.concatenate([rgb, (xs.reshape(-1, 1) / w) * xy_weight, (ys.reshape(-1, 1) / h) * xy_weight], 1)


def rgbxy_kmeans_predict(
    images: list[np.ndarray], k: int, seed: int, xy_weight: float = 1.0, max_pixels: int = 200_000
) -> list[np.ndarray]:
    """Cluster every pixel of `images` into `k` clusters by colour and position.

    One K-means (scikit-learn MiniBatchKMeans, fixed seed) is fitted on a random subsample of
    at most `max_pixels` pixels pooled over all images, then every pixel is assigned.

    Args:
        images: RGB uint8 arrays (H, W, 3); sizes may differ.
        k: number of clusters.
        seed: seed of the subsample and of K-means.
        xy_weight: weight of the normalised coordinates against the 0..1 colours.
        max_pixels: size of the fitting subsample.

    Returns:
        One int32 cluster map (H, W) per image, values in 0..k-1.
    """
    if not images:
        raise ValueError("rgbxy_kmeans_predict needs at least one image")
    rng = np.random.default_rng(seed)
    sizes = np.array([im.shape[0] * im.shape[1] for im in images])
    total = int(sizes.sum())
    take = min(max_pixels, total)
    picks = np.sort(rng.choice(total, size=take, replace=False))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for i, im in enumerate(images):
        sel = picks[(picks >= bounds[i]) & (picks < bounds[i + 1])] - bounds[i]
        if sel.size:
            parts.append(rgbxy_features(im, xy_weight)[sel])
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096)
    km.fit(np.concatenate(parts))
    return [km.predict(rgbxy_features(im, xy_weight)).astype(np.int32).reshape(im.shape[:2]) for im in images]
