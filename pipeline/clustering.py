"""Mask clustering: the algorithm behind the `cluster` stage (no file I/O).

Every mined mask gets an embedding, either the backbone's CLS token on the crop of the
mask's bounding box (MaskDistill's default; `crop_box_for_cls` makes the crop) or the mean
of the image's patch tokens inside the mask (`pooled_embeddings`, no extra forward pass).
Embeddings are whitened per dimension and L2-normalised, then clustered with spherical
faiss K-means into `k * overcluster` pseudo-classes (MaskDistill's `utils/cluster.py`).

Everything works on in-memory arrays. The embeddings of all masks (M x D float32, 150 MB
for 100k masks of a ViT-S) are held, and one whitened float32 copy of them that K-means
fits on; the float64 whitening runs on blocks of columns or rows (`whitening_stats`,
`apply_whitening_rows`), never on a float64 copy of all of them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.baseline import fit_kmeans, l2_normalize


def whitening_stats(x: np.ndarray, eps: float = 1e-8, center: bool = False, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean (zeros unless `center`) and std of `whiten`, without a float64 copy of `x`.

    The statistics are computed in float64 on blocks of about `block` columns, so the
    temporaries are (M, block), not (M, D). numpy sums along the row axis in row order for
    any number of columns, so the result is bit for bit that of the whole array.

    Returns:
        mean (D,) and std (D,), float32; dimensions whose std is below `eps` get std 1.
    """
    if np.ndim(x) != 2 or np.shape(x)[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (M, D) array, got shape {np.shape(x)}")
    d = np.shape(x)[1]
    means, stds = [], []
    for cols in np.array_split(np.arange(d), max(1, d // block)):
        a = np.asarray(x[:, cols[0] : cols[-1] + 1], dtype=np.float64)
        means.append(a.mean(axis=0) if center else np.zeros(a.shape[1]))
        stds.append(a.std(axis=0))
    mean, std = np.concatenate(means), np.concatenate(stds)
    std[std < eps] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def whiten(x: np.ndarray, eps: float = 1e-8, center: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-dimension whitening, then L2-normalisation of every row.

    MaskDistill uses `scipy.cluster.vq.whiten`, which divides every dimension by its
    standard deviation without subtracting the mean (`center=False`, the default);
    `center=True` also subtracts the mean (full standardisation). Dimensions whose std
    is below `eps` are left unscaled (vq.whiten does the same for std == 0).

    Args:
        x: (M, D) embeddings.
        eps: smallest std that is divided by.
        center: subtract the per-dimension mean first.

    Returns:
        (xw, mean, std): xw (M, D) float32 unit rows; mean (D,) float32 (zeros when not
        centering) and std (D,) float32 such that `apply_whitening(x, mean, std) == xw`.
    """
    mean, std = whitening_stats(x, eps, center)
    return apply_whitening_rows(x, mean, std), mean, std


def apply_whitening(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std, then rows scaled to unit L2 norm (float32), with stats from `whiten`."""
    a = np.asarray(x, dtype=np.float64)
    return l2_normalize((a - mean.astype(np.float64)) / std.astype(np.float64))


def apply_whitening_rows(x: np.ndarray, mean: np.ndarray, std: np.ndarray, rows: int = 4096) -> np.ndarray:
    """`apply_whitening` a block of rows at a time (every row is independent, so the result is
    the same), into one float32 array: no float64 copy of all of `x`."""
    out = np.empty(np.shape(x), dtype=np.float32)
    for start in range(0, out.shape[0], rows):
        out[start : start + rows] = apply_whitening(x[start : start + rows], mean, std)
    return out


def pooled_embeddings(patch_tokens: np.ndarray, masks_grid: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of the patch tokens inside each mask (the fast embedding, no extra forward).

    Args:
        patch_tokens: (P, D) tokens of one image, P = h * w row-major.
        masks_grid: M bool masks (h, w) on the token grid.

    Returns:
        (M, D) float32 (shape (0, D) when there are no masks).

    Raises:
        ValueError: a mask of another size than P, or an empty mask.
    """
    tokens = np.asarray(patch_tokens, dtype=np.float32)
    if tokens.ndim != 2:
        raise ValueError(f"patch_tokens must be (P, D), got shape {tokens.shape}")
    if len(masks_grid) == 0:
        return np.zeros((0, tokens.shape[1]), dtype=np.float32)
    weights = np.stack([np.asarray(m, dtype=bool).reshape(-1) for m in masks_grid]).astype(np.float32)
    if weights.shape[1] != tokens.shape[0]:
        raise ValueError(f"masks have {weights.shape[1]} cells, tokens have {tokens.shape[0]} patches")
    counts = weights.sum(axis=1)
    if (counts == 0).any():
        raise ValueError(f"mask {int(np.flatnonzero(counts == 0)[0])} is empty")
    return (weights @ tokens) / counts[:, None]


def crop_box_for_cls(image: np.ndarray, box: Sequence[int], pad: float = 0.0) -> np.ndarray:
    """The crop of a mask's box, to run the backbone on for its CLS embedding.

    MaskDistill crops the exact box (pad 0) and zero-pads the normalised crop to a
    multiple of the patch size; that resizing/padding belongs to the backbone input
    side (`pipeline.features.preprocess`), not here.

    Args:
        image: (H, W, C) image.
        box: (x0, y0, x1, y1) in pixels, x1/y1 exclusive (as `pipeline.mining.mask_box`).
        pad: context added on each side, as a fraction of the box width/height; the
            padded box is clipped to the image.

    Returns:
        (y1 - y0, x1 - x0, C) view of the image.
    """
    img = np.asarray(image)
    height, width = img.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty box {tuple(box)}")
    px, py = round(pad * (x1 - x0)), round(pad * (y1 - y0))
    x0, y0 = max(0, x0 - px), max(0, y0 - py)
    x1, y1 = min(width, x1 + px), min(height, y1 + py)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {tuple(box)} lies outside the {width}x{height} image")
    return img[y0:y1, x0:x1]


def assign_clusters(xw: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest unit-norm centroid by cosine for whitened, unit-norm rows.

    Returns:
        labels (M,) int32 (ties: the lower centroid id) and distances (M,) float32 =
        1 - cosine to the assigned centroid.
    """
    sims = np.asarray(xw, dtype=np.float32) @ np.asarray(centroids, dtype=np.float32).T
    labels = sims.argmax(axis=1)
    best = np.take_along_axis(sims, labels[:, None], axis=1)[:, 0]
    return labels.astype(np.int32), (1.0 - best).astype(np.float32)


def cluster_masks(
    embeddings: np.ndarray,
    k: int,
    overcluster: int = 1,
    seed: int = 0,
    iters: int = 100,
    redo: int = 5,
    center: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pseudo-class of every mask: spherical faiss K-means on whitened, L2-normalised embeddings.

    MaskDistill clusters into `num_classes * overcluster` groups (sklearn MiniBatchKMeans,
    seed 1234, on the same whitened unit vectors); we use faiss as the rest of useg does.

    Args:
        embeddings: (M, D) mask embeddings.
        k: number of classes.
        overcluster: factor on `k` (1: as many clusters as classes).
        seed: K-means seed.
        iters: K-means iterations.
        redo: K-means restarts (the best objective is kept).
        center: subtract the mean in whitening (see `whiten`).

    Returns:
        labels (M,) int32 in [0, k * overcluster), distances (M,) float32 = 1 - cosine to
        the assigned centroid, centroids (k * overcluster, D) float32, unit norm, in the
        whitened space.

    Raises:
        ValueError: bad k/overcluster, or fewer embeddings than clusters.
    """
    if k < 1 or overcluster < 1:
        raise ValueError(f"k and overcluster must be >= 1, got k={k}, overcluster={overcluster}")
    n_clusters = k * overcluster
    xw, _, _ = whiten(embeddings, center=center)
    centroids = fit_kmeans(xw, n_clusters, iters=iters, seed=seed, redo=redo, spherical=True)
    labels, distances = assign_clusters(xw, centroids)
    return labels, distances, centroids
