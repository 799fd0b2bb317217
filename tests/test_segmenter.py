"""DeepLabv3-MobileNetV2 segmenter, its training loop, and the OHEM loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from pipeline.errors import DataError, ParamsError
from pipeline.losses import ohem_cross_entropy
from pipeline.segmenter import (
    SegmentConfig,
    augment,
    build_deeplab,
    poly_lr,
    predict_segmenter,
    predict_segmenter_batch,
    train_segmenter,
)

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# --- OHEM ------------------------------------------------------------------------------


def ten_pixel_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (1, 2, 2, 5) with class-1 score a = 0..9 and target 0: CE = log(1 + e^a)."""
    a = torch.arange(10, dtype=torch.float32).view(1, 1, 2, 5)
    return torch.cat([torch.zeros_like(a), a], dim=1), torch.zeros(1, 2, 5, dtype=torch.long)


def ce(a: float) -> float:
    return math.log(1.0 + math.exp(a))


def test_ohem_averages_the_hardest_fifth():
    logits, target = ten_pixel_batch()
    # 20% of 10 pixels = 2 hardest: a = 9 and a = 8.
    assert ohem_cross_entropy(logits, target).item() == pytest.approx((ce(9) + ce(8)) / 2, rel=1e-5)
    assert ohem_cross_entropy(logits, target, top_fraction=1.0).item() == pytest.approx(
        sum(ce(a) for a in range(10)) / 10, rel=1e-5
    )


def test_ohem_skips_ignored_pixels():
    logits, target = ten_pixel_batch()
    target.view(-1)[[9, 7, 5, 3, 1]] = 255  # the hardest pixel (a = 9) is ignored
    # Official: int(0.2 * 10 pixels) = 2 among the valid a = 0, 2, 4, 6, 8 -> 8 and 6.
    assert ohem_cross_entropy(logits, target).item() == pytest.approx((ce(8) + ce(6)) / 2, rel=1e-5)
    # Fraction of the 5 valid pixels: 1 -> a = 8.
    assert ohem_cross_entropy(logits, target, relative_to="valid").item() == pytest.approx(ce(8), rel=1e-5)


def test_ohem_all_ignored_is_zero_with_a_gradient():
    logits, target = ten_pixel_batch()
    logits.requires_grad_(True)
    loss = ohem_cross_entropy(logits, torch.full_like(target, 255))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_ohem_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected"):
        ohem_cross_entropy(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))


# --- model -----------------------------------------------------------------------------


@pytest.mark.parametrize("output_stride", [16, 8])
def test_deeplab_logits_at_input_size(output_stride):
    torch.manual_seed(0)
    model = build_deeplab(5, None, output_stride).eval()
    x = torch.randn(2, 3, SIZE, 48)
    with torch.no_grad():
        assert tuple(model.backbone(x).shape) == (2, 320, SIZE // output_stride, 48 // output_stride)
        assert tuple(model(x).shape) == (2, 5, SIZE, 48)


def test_imagenet_state_dict_loads_into_the_trunk(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet_v2.pt"
    torch.save(reference.state_dict(), path)
    model = build_deeplab(3, path)
    assert len(model.backbone) == 18
    assert torch.equal(model.backbone[17].conv[1][0].weight, reference.features[17].conv[1][0].weight)
    assert model.backbone[14].conv[1][0].stride == (1, 1)  # dilated instead of strided


# --- training --------------------------------------------------------------------------


def white_squares(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Trivially learnable: class 1 exactly where the image is white, 0 elsewhere."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        label = np.zeros((SIZE, SIZE), np.uint8)
        y, x = rng.integers(0, SIZE // 2, 2)
        label[y : y + 24, x : x + 24] = 1
        images.append(np.where(label[..., None] == 1, 255, 0).astype(np.uint8).repeat(3, axis=2))
        labels.append(label)
    return images, labels


EASY = SegmentConfig(
    epochs=8, batch_size=4, lr=0.05, crop_size=SIZE, scale_range=[1.0, 1.0], hflip=False, ohem_fraction=1.0
)


def test_training_decreases_the_loss_and_logs_each_epoch():
    images, labels = white_squares(8)
    records: list[dict] = []
    model = train_segmenter(images, labels, 2, EASY, progress=False, log=records.append)
    assert [r["epoch"] for r in records] == list(range(EASY.epochs))
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    assert records[0]["lr"] > records[-1]["lr"] > 0
    assert not model.training


def test_training_is_deterministic_and_takes_loader_callables():
    images, labels = white_squares(4)
    cfg = SegmentConfig(epochs=1, batch_size=2, crop_size=48, scale_range=[0.5, 1.5])
    a, b = [], []
    train_segmenter(images, labels, 2, cfg, progress=False, log=a.append)
    train_segmenter(images.__getitem__, labels.__getitem__, 2, cfg, progress=False, log=b.append, num_images=4)
    assert a == b


def test_prediction_probabilities_at_original_size():
    torch.manual_seed(0)
    model = build_deeplab(3, None)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    probs = predict_segmenter(model, image, size=(64, 64))
    assert probs.shape == (3, 50, 70) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert model.training  # mode restored
    images = [image, rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), image]
    batched = list(predict_segmenter_batch(model, images, size=None, batch_size=2))
    assert [p.shape for p in batched] == [(3, 50, 70), (3, 40, 40), (3, 50, 70)]
    np.testing.assert_allclose(batched[0], predict_segmenter(model, image), atol=1e-5)


def test_augment_pads_with_ignore_and_crops():
    images, labels = white_squares(1)
    cfg = SegmentConfig(crop_size=SIZE, scale_range=[0.5, 0.5])
    x, y = augment(images[0], labels[0], cfg, np.random.default_rng(0))
    assert tuple(x.shape) == (3, SIZE, SIZE) and tuple(y.shape) == (SIZE, SIZE)
    assert set(y.unique().tolist()) == {0, 1, 255}
    assert (y == 255).sum().item() == SIZE * SIZE - (SIZE // 2) ** 2


def test_bad_inputs_are_rejected():
    images, labels = white_squares(2)
    with pytest.raises(DataError, match="class id 5 out of range"):
        train_segmenter(images, [np.full_like(lab, 5) for lab in labels], 2, EASY, progress=False)
    with pytest.raises(DataError, match="at least 2"):
        train_segmenter(images[:1], labels[:1], 2, EASY, progress=False)
    with pytest.raises(DataError, match="does not match"):
        train_segmenter(images, [lab[:-1] for lab in labels], 2, EASY, progress=False)
    with pytest.raises(ParamsError, match="segment.scale_range"):
        SegmentConfig(scale_range=[2.0, 1.0])


def test_poly_schedule():
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)
