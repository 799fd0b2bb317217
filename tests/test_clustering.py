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
    whitening_stats,
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


def test_whitening_in_blocks_is_bit_identical_to_whole_array_numpy() -> None:
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(3001, 200)) * rng.uniform(0.1, 10, 200) + 5 * rng.normal(size=200)).astype(np.float32)
    a = x.astype(np.float64)
    for center in (False, True):
        mean, std = whitening_stats(x, center=center, block=48)
        assert np.array_equal(std, a.std(axis=0).astype(np.float32))
        assert np.array_equal(mean, (a.mean(axis=0) if center else np.zeros(200)).astype(np.float32))
        xw, _, _ = whiten(x, center=center)
        assert np.array_equal(xw, apply_whitening(x, mean, std))


def test_pooled_stage_reads_in_blocks_and_matches_per_image_pooling(tmp_path) -> None:
    import h5py

    from stages.cluster import pooled

    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(9, 4, 3)).astype(np.float16)  # 9 images, 2x2 grid, D = 3
    pos = np.array([0, 0, 2, 3, 3, 3, 7, 8])  # images 1, 4, 5, 6 have no mask
    grids = rng.integers(0, 2, size=(len(pos), 2, 2)).astype(np.uint8)
    grids[:, 0, 0] = 1
    with h5py.File(tmp_path / "f.h5", "w") as feats, h5py.File(tmp_path / "m.h5", "w") as masks:
        feats["patch_tokens"] = tokens
        masks["image_index"] = pos
        masks["grid_masks"] = grids
        expected = np.concatenate([
            pooled_embeddings(tokens[p].astype(np.float32), [g.astype(bool) for g in grids[pos == p]]) for p in np.unique(pos)
        ])
        for max_bytes in (1, 2 * 4 * 3 * 4, 1 << 20):  # one, two or all images per block
            assert np.array_equal(pooled(masks, feats, max_bytes=max_bytes), expected)


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
