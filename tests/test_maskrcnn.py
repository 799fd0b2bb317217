"""Mask R-CNN pseudo-label training, prediction and MaskDistill's filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from pipeline.errors import DataError, ParamsError
from pipeline.maskrcnn import (
    DistillConfig,
    boxes_from_masks,
    build_maskrcnn,
    filter_and_paste,
    lr_at,
    maskrcnn_from_config,
    predict_instances,
    predict_instances_batch,
    select_confident,
    train_maskrcnn,
)

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def planted_squares(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[list[tuple[np.ndarray, int]]]]:
    """Dark noisy images, each with one bright square of class 1 (red) or 2 (blue)."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for i in range(n):
        image = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
        mask = np.zeros((SIZE, SIZE), bool)
        y, x = rng.integers(4, SIZE // 2, 2)
        mask[y : y + 24, x : x + 24] = True
        cls = 1 + i % 2
        image[mask] = (220, 40, 40) if cls == 1 else (40, 40, 220)
        images.append(image)
        targets.append([(mask, cls)])
    return images, targets


TINY = DistillConfig(epochs=2, batch_size=2, min_size=SIZE, max_size=SIZE, warmup_iters=1, lr=0.01)


def test_train_predict_and_skip_empty_images():
    images, targets = planted_squares(4)
    images.append(np.zeros((SIZE, SIZE, 3), np.uint8))
    targets.append([(np.zeros((SIZE, SIZE), bool), 1)])  # nothing to learn from
    records: list[dict] = []
    model = train_maskrcnn(images, targets, TINY, progress=False, log=records.append)

    assert [r["epoch"] for r in records] == [0, 1]
    assert all(r["images_used"] == 4 and r["images_skipped"] == 1 for r in records)
    assert all(np.isfinite(r["loss"]) and {"loss_mask", "loss_objectness", "lr"} <= set(r) for r in records)
    assert not model.training

    detections = predict_instances(model, images[0])
    assert detections, "score_floor=0 keeps low-scoring detections of an untrained model"
    scores = [s for _, s, _ in detections]
    assert scores == sorted(scores, reverse=True)
    for mask, score, cls in detections:
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.float32
        assert 0.0 <= mask.min() and mask.max() <= 1.0 and 0.0 < score <= 1.0 and cls in (1, 2)


def test_predict_at_original_size_for_images_of_different_sizes():
    torch.manual_seed(0)
    model = build_maskrcnn(2, None, SIZE, 2 * SIZE).eval()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (48, 80, 3), dtype=np.uint8), rng.integers(0, 255, (64, 40, 3), dtype=np.uint8)]
    out = predict_instances_batch(model, images)
    assert model.roi_heads.score_thresh == pytest.approx(0.05)  # restored
    for image, detections in zip(images, out):
        assert all(m.shape == image.shape[:2] for m, _, _ in detections)


def test_training_is_deterministic():
    images, targets = planted_squares(2)
    cfg = DistillConfig(epochs=1, batch_size=2, min_size=SIZE, max_size=SIZE, warmup_iters=0)
    a = train_maskrcnn(images, targets, cfg, progress=False).state_dict()
    b = train_maskrcnn(images, targets, cfg, progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_model_rebuilds_from_its_config():
    torch.manual_seed(0)
    state = maskrcnn_from_config(3, TINY).state_dict()
    torch.manual_seed(1)
    rebuilt = maskrcnn_from_config(3, TINY)
    rebuilt.load_state_dict(state, strict=True)
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in state.items())


def test_no_masks_at_all_is_rejected():
    images = [np.zeros((SIZE, SIZE, 3), np.uint8)] * 2
    with pytest.raises(DataError, match="none of the 2 images"):
        train_maskrcnn(images, [[], [(np.zeros((SIZE, SIZE), bool), 1)]], TINY, progress=False)


def test_class_id_zero_is_rejected():
    images, targets = planted_squares(2)
    targets[0] = [(targets[0][0][0], 0)]
    with pytest.raises(DataError, match="must be >= 1"):
        train_maskrcnn(images, targets, TINY, num_classes=2, progress=False)


def test_imagenet_state_dict_loads_into_the_backbone(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet_v2.pt"
    torch.save(reference.state_dict(), path)
    model = build_maskrcnn(3, path, SIZE, SIZE)
    body = model.backbone.body
    assert torch.equal(body["0"][0].weight, reference.features[0][0].weight)
    assert torch.equal(body["18"][1].running_var, reference.features[18][1].running_var)


@pytest.mark.parametrize("trainable, first_trained", [(0, None), (3, "7"), (6, "0")])
def test_trainable_layers(trainable, first_trained):
    model = build_maskrcnn(1, None, SIZE, SIZE, trainable_layers=trainable)
    body = model.backbone.body
    trained = [name for name, module in body.named_children() if any(p.requires_grad for p in module.parameters())]
    assert (trained[0] if trained else None) == first_trained
    assert all(p.requires_grad for p in model.roi_heads.parameters())


def test_config_rejects_bad_lr_steps():
    with pytest.raises(ParamsError, match="distill.lr_steps"):
        DistillConfig(lr_steps=[1.5])


def test_lr_warmup_and_steps():
    cfg = DistillConfig(lr=0.1, warmup_iters=10, lr_steps=[0.5])
    assert lr_at(0, 100, cfg) == pytest.approx(0.1 * 0.001)
    assert lr_at(10, 100, cfg) == pytest.approx(0.1)
    assert lr_at(50, 100, cfg) == pytest.approx(0.01)


def test_boxes_from_masks_have_exclusive_ends():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:5, 1:3] = True
    masks[1, 7, 7] = True
    np.testing.assert_array_equal(boxes_from_masks(masks), [[1, 2, 3, 5], [7, 7, 8, 8]])


def box(y0: int, y1: int, x0: int, x1: int, shape: tuple[int, int] = (10, 10)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_filter_keeps_detections_at_or_above_threshold():
    dets = [(box(0, 3, 0, 3), 0.95, 1), (box(5, 8, 5, 8), 0.5, 2), (box(0, 3, 6, 9), 0.9, 3)]
    out = filter_and_paste(dets, 10, 10, score_threshold=0.9)
    expected = np.zeros((10, 10), np.uint8)
    expected[0:3, 0:3] = 1
    expected[0:3, 6:9] = 3
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8


def test_filter_keeps_only_the_best_when_none_reaches_threshold():
    dets = [(box(0, 3, 0, 3), 0.5, 1), (box(5, 8, 5, 8), 0.7, 2), (box(0, 3, 6, 9), 0.3, 3)]
    out = filter_and_paste(dets, 10, 10, score_threshold=0.9)
    np.testing.assert_array_equal(out, np.where(box(5, 8, 5, 8), 2, 0))
    assert [d[1] for d in select_confident(dets, 0.9)] == [0.7]


def test_filter_min_keep_keeps_the_best_few_when_too_few_are_confident():
    dets = [(box(0, 3, 0, 3), 0.5, 1), (box(5, 8, 5, 8), 0.95, 2), (box(0, 3, 6, 9), 0.3, 3), (box(8, 10, 0, 2), 0.1, 4)]
    # One confident detection, min_keep 3: the three best, whatever their score.
    assert [d[1] for d in select_confident(dets, 0.9, min_keep=3)] == [0.95, 0.5, 0.3]
    out = filter_and_paste(dets, 10, 10, score_threshold=0.9, min_keep=3)
    expected = np.zeros((10, 10), np.uint8)
    expected[0:3, 0:3] = 1
    expected[5:8, 5:8] = 2
    expected[0:3, 6:9] = 3
    np.testing.assert_array_equal(out, expected)
    # Enough confident ones: min_keep does not lower the threshold.
    assert [d[1] for d in select_confident(dets, 0.4, min_keep=2)] == [0.95, 0.5]
    # min_keep 1 is the paper's rule; more than there are keeps them all.
    assert select_confident(dets, 0.99) == select_confident(dets, 0.99, min_keep=1) == [dets[1]]
    assert len(select_confident(dets, 0.99, min_keep=10)) == 4


def test_filter_skips_a_whole_mask_that_overlaps_a_better_one():
    # Given out of order: pasting goes by descending score.
    dets = [
        (box(2, 6, 2, 6), 0.95, 2),  # overlaps the best one by one pixel: skipped entirely
        (box(0, 3, 0, 3), 0.99, 1),
        (box(7, 9, 7, 9), 0.93, 3),  # disjoint: pasted
    ]
    out = filter_and_paste(dets, 10, 10, score_threshold=0.9)
    expected = np.zeros((10, 10), np.uint8)
    expected[0:3, 0:3] = 1
    expected[7:9, 7:9] = 3
    np.testing.assert_array_equal(out, expected)


def test_filter_binarises_probabilities_at_mask_threshold():
    probs = np.zeros((4, 4), np.float32)
    probs[0, 0], probs[0, 1], probs[0, 2] = 0.5, 0.49, 0.9
    out = filter_and_paste([(probs, 0.99, 4)], 4, 4)
    assert out[0].tolist() == [4, 0, 4, 0] and out[1:].sum() == 0


def test_filter_with_no_detections_is_background():
    np.testing.assert_array_equal(filter_and_paste([], 3, 5), np.zeros((3, 5), np.uint8))


def test_filter_rejects_bad_input():
    with pytest.raises(ValueError, match="does not match"):
        filter_and_paste([(box(0, 1, 0, 1, (4, 4)), 1.0, 1)], 5, 5)
    with pytest.raises(ValueError, match="class id 255"):
        filter_and_paste([(box(0, 1, 0, 1), 1.0, 255)], 10, 10)
    out = filter_and_paste([(box(0, 1, 0, 1), 1.0, 300)], 10, 10, dtype=np.uint16)
    assert out.dtype == np.uint16 and out[0, 0] == 300
