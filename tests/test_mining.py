"""Known-answer tests for pipeline.mining: attention, saliency and spectral masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from pipeline.mining import (
    AttentionMiningConfig,
    attention_mask,
    attention_mass_mask,
    cls_attention_map,
    cls_patch_logits,
    mask_box,
    mask_score,
    postprocess_saliency,
    prior_saliency,
    spectral_masks,
    upsample_mask,
)

# ---- attention masks ------------------------------------------------------------------

GRID = (6, 6)
HEADS, DH = 2, 4
BLOCK_A = (slice(1, 3), slice(1, 3))
BLOCK_B = (slice(4, 6), slice(4, 6))


def _attention_case() -> tuple[np.ndarray, np.ndarray]:
    """Two disconnected 2x2 blocks A and B of keys with strong mutual affinity.

    Per head (basis e0..e3 of that head's 4 dims): background keys e1 - 0.1 e0 (negative
    affinity to both blocks); head 0 keys A = e0 + 0.5 e2, B = e0 and query e0 + e2
    (head 0 attends to A most); head 1 keys A = e0, B = e0 + 0.5 e2 and query e0 + 3 e2
    (head 1 attends to B, strongly). A and B have positive affinity to each other, so
    both are foreground after diffusion: only the connected-component step separates them.
    """
    e = np.eye(DH)
    keys = np.zeros((*GRID, HEADS * DH))
    keys[..., :DH] = keys[..., DH:] = e[1] - 0.1 * e[0]
    keys[BLOCK_A][..., :DH], keys[BLOCK_A][..., DH:] = e[0] + 0.5 * e[2], e[0]
    keys[BLOCK_B][..., :DH], keys[BLOCK_B][..., DH:] = e[0], e[0] + 0.5 * e[2]
    query = np.concatenate([e[0] + e[2], e[0] + 3 * e[2]])
    return query.astype(np.float16), keys.reshape(-1, HEADS * DH).astype(np.float16)


def _block(sl: tuple[slice, slice]) -> np.ndarray:
    m = np.zeros(GRID, dtype=bool)
    m[sl] = True
    return m


def test_attention_mask_keeps_the_seed_component_and_drops_the_other_block() -> None:
    query, keys = _attention_case()
    k = keys.astype(np.float64)
    # precondition: B is foreground for sources in A (positive affinity), so the CC step matters
    assert (k[_block(BLOCK_B).ravel()] @ k[_block(BLOCK_A).ravel()].T > 0).all()
    mask = attention_mask(query, keys, GRID, HEADS, AttentionMiningConfig(num_heads_avg=1))
    np.testing.assert_array_equal(mask, _block(BLOCK_A))


def test_attention_mask_averages_only_the_first_heads() -> None:
    query, keys = _attention_case()
    # with head 1 in the average the seed moves to B
    for norm in ("sum", "softmax"):
        cfg = AttentionMiningConfig(num_heads_avg=2, mass_normalisation=norm)
        np.testing.assert_array_equal(attention_mask(query, keys, GRID, HEADS, cfg), _block(BLOCK_B))


def test_attention_mask_is_never_empty_even_for_zero_keys() -> None:
    mask = attention_mask(np.ones(8), np.zeros((36, 8)), GRID, HEADS, AttentionMiningConfig(num_heads_avg=2))
    assert mask.sum() == 1 and mask[0, 0]


def test_attention_mask_rejects_bad_input() -> None:
    query, keys = _attention_case()
    with pytest.raises(ValueError, match="grid"):
        attention_mask(query, keys, (5, 6), HEADS, AttentionMiningConfig(num_heads_avg=1))
    with pytest.raises(ValueError, match="heads"):
        attention_mask(query, keys, GRID, 3, AttentionMiningConfig(num_heads_avg=1))
    with pytest.raises(ValueError, match="num_heads_avg"):
        attention_mask(query, keys, GRID, HEADS, AttentionMiningConfig(num_heads_avg=5))
    with pytest.raises(ValueError, match="mass_normalisation"):
        AttentionMiningConfig(mass_normalisation="max")
    with pytest.raises(ValueError, match="topk"):
        AttentionMiningConfig(topk=0.0)


def test_cls_patch_logits_are_unscaled_per_head_dot_products() -> None:
    q = np.array([1.0, 2.0, 3.0, 4.0])
    k = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(cls_patch_logits(q, k, heads=2), [[1.0, 2.0], [4.0, 3.0]])


def test_attention_mass_mask_keeps_the_patch_that_crosses_the_mass() -> None:
    attn = np.array([0.1, 0.4, 0.3, 0.2])
    # descending 0.4 (mass before: 0), 0.3 (0.4 < 0.5: kept), 0.2 (0.7: dropped)
    np.testing.assert_array_equal(attention_mass_mask(attn, 0.5), [False, True, True, False])
    np.testing.assert_array_equal(attention_mass_mask(attn, 0.35), [False, True, False, False])
    assert attention_mass_mask(np.array([-1.0, 0.5]), 0.5).all()  # non-positive total: keep all


def test_cls_attention_map_and_mask_score() -> None:
    attn = np.zeros((2, 4))
    attn[0] = [0.4, 0.2, 0.1, 0.1]  # 0.2 of the mass on non-patch tokens
    attn[1] = [0.0, 0.0, 0.0, 0.8]
    amap = cls_attention_map(attn, (2, 2), num_heads_avg=1)
    np.testing.assert_allclose(amap, [[2.0, 1.0], [0.5, 0.5]])
    assert mask_score(np.array([[True, True], [False, False]]), amap) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="empty"):
        mask_score(np.zeros((2, 2), bool), amap)


# ---- mask helpers -----------------------------------------------------------------------


def test_upsample_mask_and_mask_box() -> None:
    grid = np.zeros((3, 4), dtype=bool)
    grid[1, 2:] = True
    up = upsample_mask(grid, (42, 56))
    assert up.shape == (42, 56) and up.dtype == bool
    assert mask_box(up) == (28, 14, 56, 28)  # exactly the two cells of 14x14 pixels
    assert mask_box(grid) == (2, 1, 4, 2)
    with pytest.raises(ValueError, match="empty"):
        mask_box(np.zeros((3, 3), bool))


# ---- saliency -----------------------------------------------------------------------------


def test_postprocess_saliency_drops_small_components() -> None:
    sal = np.zeros((100, 100), dtype=np.float32)
    sal[20:60, 20:60] = 0.9  # 16% of the image
    sal[80:83, 80:83] = 1.0  # 0.09%: removed
    sal[0:10, 90:100] = 0.5  # exactly the threshold: not salient (> 0.5)
    mask = postprocess_saliency(sal)
    expected = np.zeros((100, 100), dtype=bool)
    expected[20:60, 20:60] = True
    np.testing.assert_array_equal(mask, expected)


def test_postprocess_saliency_drops_images_with_tiny_salient_area() -> None:
    sal = np.zeros((100, 100))
    sal[10:19, 10:19] = 1.0  # 81 px = 0.81% (one component, kept with min_component=0)
    assert postprocess_saliency(sal) is None
    assert postprocess_saliency(sal, min_component=0.0, min_area=0.005) is not None


def test_prior_saliency_finds_a_distinct_central_object() -> None:
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(120, 12, size=(64, 80, 3)), 0, 255).astype(np.uint8)  # textured grey
    img[20:44, 28:52] = (200, 40, 40)
    sal = prior_saliency(img)
    assert sal.shape == (64, 80) and sal.dtype == np.float32
    assert 0.0 <= sal.min() and sal.max() <= 1.0
    obj = np.zeros((64, 80), dtype=bool)
    obj[20:44, 28:52] = True
    mask = postprocess_saliency(sal)
    assert mask is not None
    assert (mask & obj).sum() / (mask | obj).sum() > 0.7
    np.testing.assert_array_equal(prior_saliency(img), sal)  # deterministic


def test_prior_saliency_of_a_flat_image_is_zero_and_dropped() -> None:
    sal = prior_saliency(np.full((32, 32, 3), 77, dtype=np.uint8))
    assert not sal.any()
    assert postprocess_saliency(sal) is None


# ---- spectral masks -------------------------------------------------------------------------


def _planted_regions() -> tuple[np.ndarray, np.ndarray]:
    """A 12x12 grid split into 3 regions (left half, top-right, bottom-right), noisy tokens."""
    seg = np.zeros((12, 12), dtype=np.int64)
    seg[:5, 6:] = 1
    seg[5:, 6:] = 2
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32))
    tokens = centres[seg.ravel()] + 0.4 * rng.normal(size=(144, 32))
    return tokens.astype(np.float32), seg


def test_spectral_masks_recover_planted_regions() -> None:
    tokens, seg = _planted_regions()
    masks = spectral_masks(tokens, (12, 12), k=3, seed=0)
    assert len(masks) == 3
    areas = [int(m.sum()) for m in masks]
    assert areas == sorted(areas, reverse=True)
    iou = np.array([[(m & (seg == c)).sum() / (m | (seg == c)).sum() for c in range(3)] for m in masks])
    rows, cols = linear_sum_assignment(-iou)
    assert iou[rows, cols].min() > 0.9
    again = spectral_masks(tokens, (12, 12), k=3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(masks, again))


def test_spectral_masks_min_area_and_bad_input() -> None:
    tokens, _ = _planted_regions()
    # regions cover 72, 42 and 30 of 144 cells (50%, 29%, 21%)
    assert [int(m.sum()) for m in spectral_masks(tokens, (12, 12), k=3, min_area=0.25)] == [72, 42]
    assert len(spectral_masks(tokens, (12, 12), k=3, min_area=0.3)) == 1
    assert len(spectral_masks(tokens, (12, 12), k=1)) == 1
    with pytest.raises(ValueError, match="grid"):
        spectral_masks(tokens, (12, 11), k=3)
    with pytest.raises(ValueError, match="k="):
        spectral_masks(tokens, (12, 12), k=0)
