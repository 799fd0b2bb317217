"""Dense CRF refinement and CRF self-training labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import CRFSection
from pipeline.crf import CRFConfig, crf_self_training_labels, dense_crf, dense_crf_probs
from pipeline.segmenter import build_deeplab


def two_colour_scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A red/blue image, its region map, and noisy class probabilities that lean the right way."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((64, 64), np.uint8)
    gt[:, 24:] = 1
    gt[10:30, 40:60] = 0
    image = np.where(gt[..., None] == 1, np.uint8([200, 40, 40]), np.uint8([40, 40, 200])).astype(np.uint8)
    p1 = np.clip(np.where(gt == 1, 0.65, 0.35) + rng.normal(0.0, 0.25, gt.shape), 0.01, 0.99)
    return image, gt, np.stack([1.0 - p1, p1]).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_crf_follows_image_edges_better_than_argmax(seed):
    image, gt, probs = two_colour_scene(seed)
    argmax_acc = (probs.argmax(0) == gt).mean()
    labels = dense_crf(image, probs)
    assert labels.dtype == np.uint8 and labels.shape == gt.shape
    crf_acc = (labels == gt).mean()
    assert argmax_acc < 0.85
    assert crf_acc > 0.98 and crf_acc > argmax_acc


def test_crf_keeps_a_clean_map():
    image, gt, _ = two_colour_scene()
    clean = np.stack([gt == 0, gt == 1]).astype(np.float32) * 0.9 + 0.05
    np.testing.assert_array_equal(dense_crf(image, clean), gt)


def test_crf_marginals_are_distributions():
    image, _, probs = two_colour_scene()
    q = dense_crf_probs(image, probs, iters=3)
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)


def test_crf_rejects_mismatched_inputs():
    image, _, probs = two_colour_scene()
    with pytest.raises(ValueError, match="probs must be"):
        dense_crf(image, probs[:, :-1])
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), probs)


def test_self_training_labels_one_map_per_image():
    torch.manual_seed(0)
    model = build_deeplab(3, None)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 56, 3), dtype=np.uint8), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)]
    maps = list(crf_self_training_labels(model, images, CRFConfig(iters=2), size=(32, 32)))
    assert [m.shape for m in maps] == [(40, 56), (32, 32)]
    assert all(m.dtype == np.uint8 and m.max() < 3 for m in maps)
    # The stage passes the `crf` params section (kernel settings plus rounds/predict): same maps.
    section = CRFSection(iters=2, rounds=1, predict=True)
    again = list(crf_self_training_labels(model, images, section, size=(32, 32)))
    assert all(np.array_equal(a, b) for a, b in zip(maps, again))


def test_crf_accepts_a_read_only_image():
    # images decoded with np.asarray(PIL image) are read-only; pydensecrf needs a writable buffer
    image, gt, probs = two_colour_scene()
    image.setflags(write=False)
    assert dense_crf(image, probs).shape == gt.shape
