"""Known-answer tests for pipeline.clustering: whitening, mask embeddings, K-means of masks."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.clustering import (
    apply_whitening,
    assign_clusters,
    cluster_masks,
    crop_box_for_cls,
    pooled_embeddings,
    whiten,
)


def test_whiten_scales_each_dimension_then_normalises_rows() -> None:
    x = np.array([[1.0, 10.0, 5.0], [3.0, 30.0, 5.0], [5.0, 20.0, 5.0]])
    xw, mean, std = whiten(x)
    np.testing.assert_allclose(mean, 0.0)
    np.testing.assert_allclose(std, [np.std([1, 3, 5]), np.std([10, 30, 20]), 1.0], rtol=1e-6)  # constant dim: 1
    expected = x / std
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(xw, expected, rtol=1e-6)
    assert xw.dtype == np.float32 and np.isfinite(xw).all()
    np.testing.assert_allclose(apply_whitening(x, mean, std), xw, rtol=1e-6)


def test_whiten_with_centering_subtracts_the_mean() -> None:
    x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])
    xw, mean, std = whiten(x, center=True)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-6)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    np.testing.assert_allclose(xw, z / np.linalg.norm(z, axis=1, keepdims=True), rtol=1e-5)


def test_pooled_embeddings_average_tokens_inside_masks() -> None:
    tokens = np.arange(8, dtype=np.float16).reshape(4, 2)  # 2x2 grid, D = 2
    m1 = np.array([[True, False], [False, True]])
    m2 = np.array([[False, True], [False, False]])
    emb = pooled_embeddings(tokens, [m1, m2])
    np.testing.assert_allclose(emb, [[3.0, 4.0], [2.0, 3.0]])
    assert emb.dtype == np.float32
    assert pooled_embeddings(tokens, []).shape == (0, 2)
    with pytest.raises(ValueError, match="empty"):
        pooled_embeddings(tokens, [m1, np.zeros((2, 2), bool)])
    with pytest.raises(ValueError, match="cells"):
        pooled_embeddings(tokens, [np.ones((3, 3), bool)])


def test_crop_box_for_cls_pads_and_clips() -> None:
    img = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    np.testing.assert_array_equal(crop_box_for_cls(img, (4, 2, 8, 6)), img[2:6, 4:8])
    # pad 0.5 of a 4x4 box = 2 px each side; clipped at the top-left corner
    np.testing.assert_array_equal(crop_box_for_cls(img, (1, 1, 5, 5), pad=0.5), img[0:7, 0:7])
    with pytest.raises(ValueError, match="empty box"):
        crop_box_for_cls(img, (3, 3, 3, 5))


def _two_groups(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, 16)) * 3.0
    truth = np.repeat([0, 1], 30)
    rng.shuffle(truth)
    x = centres[truth] + 0.3 * rng.normal(size=(60, 16))
    return x.astype(np.float32), truth


@pytest.mark.parametrize("center", [False, True])
def test_cluster_masks_recovers_two_separated_groups(center: bool) -> None:
    x, truth = _two_groups()
    labels, dist, centroids = cluster_masks(x, k=2, seed=0, iters=20, redo=2, center=center)
    assert labels.shape == (60,) and labels.dtype == np.int32
    assert centroids.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    # same partition up to renaming
    assert len({(int(a), int(b)) for a, b in zip(labels, truth)}) == 2
    assert dist.dtype == np.float32 and (dist >= -1e-6).all() and dist.max() < 0.5


def test_cluster_masks_is_deterministic_and_overclusters() -> None:
    x, _ = _two_groups(seed=1)
    a = cluster_masks(x, k=2, overcluster=2, seed=3, iters=20, redo=2)
    b = cluster_masks(x, k=2, overcluster=2, seed=3, iters=20, redo=2)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert a[2].shape == (4, 16) and set(a[0].tolist()) <= {0, 1, 2, 3}


def test_cluster_masks_rejects_too_few_embeddings() -> None:
    x, _ = _two_groups()
    with pytest.raises(ValueError, match="at least"):
        cluster_masks(x[:3], k=2, overcluster=2)
    with pytest.raises(ValueError, match="overcluster"):
        cluster_masks(x, k=2, overcluster=0)


def test_assign_clusters_is_nearest_by_cosine() -> None:
    c = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    xw = np.array([[0.8, 0.6], [0.6, 0.8]], dtype=np.float32)
    labels, dist = assign_clusters(xw, c)
    np.testing.assert_array_equal(labels, [0, 1])
    np.testing.assert_allclose(dist, [0.2, 0.2], rtol=1e-5)
