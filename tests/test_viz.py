"""Tests for pipeline.viz: sizes, colours, and byte-identical outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.viz import colorize, confusion_png, overlay, overlay_grid, palette


def test_palette_is_distinct_deterministic_and_never_black() -> None:
    for n in (1, 21, 300):
        colors = palette(n)
        assert colors.shape == (n, 3) and colors.dtype == np.uint8
        assert len({tuple(c) for c in colors}) == n
        assert not np.any(np.all(colors == 0, axis=1))
        np.testing.assert_array_equal(colors, palette(n))
    np.testing.assert_array_equal(palette(3), [[128, 0, 0], [0, 128, 0], [128, 128, 0]])


def test_colorize_draws_ignore_black() -> None:
    labels = np.array([[0, 1], [255, 2]], dtype=np.uint8)
    rgb = colorize(labels)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[1, 0], [0, 0, 0])
    np.testing.assert_array_equal(rgb[0, 0], palette(1)[0])
    with pytest.raises(ValueError, match="2-D integer"):
        colorize(np.zeros((2, 2), dtype=np.float32))


def test_overlay_blends_and_keeps_image_on_ignore() -> None:
    image = np.full((4, 5, 3), 200, dtype=np.uint8)
    labels = np.zeros((4, 5), dtype=np.uint8)
    labels[0, 0] = 255
    out = overlay(image, labels, alpha=0.5)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [200, 200, 200])
    np.testing.assert_array_equal(out[1, 1], [164, 100, 100])  # (200 + (128, 0, 0)) / 2
    np.testing.assert_array_equal(overlay(image, labels, alpha=0.0), image)
    with pytest.raises(ValueError, match="size"):
        overlay(image, labels[:3])


def _grid_rows() -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(2):
        image = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
        gt = rng.integers(0, 4, size=(32, 48)).astype(np.uint8)
        pred = rng.integers(0, 4, size=(16, 24)).astype(np.int64)  # a smaller map is scaled up
        rows.append([image, gt, pred])
    return rows


def test_overlay_grid_size_and_identical_bytes(tmp_path: Path) -> None:
    titles = ["image", "GT", "prediction"]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    overlay_grid(_grid_rows(), titles, a, tile_height=64)
    overlay_grid(_grid_rows(), titles, b, tile_height=64)
    assert a.read_bytes() == b.read_bytes()
    with Image.open(a) as img:
        # 3 tiles of 96x64 with 4 px padding, a 20 px title band, 2 rows
        assert img.size == (3 * 96 + 4 * 4, 20 + 2 * (64 + 4) + 4)
        assert img.mode == "RGB"
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_overlay_grid_rejects_ragged_rows(tmp_path: Path) -> None:
    rows = _grid_rows()
    rows[1] = rows[1][:2]
    with pytest.raises(ValueError, match="row 1 has 2 tiles"):
        overlay_grid(rows, ["image", "GT", "prediction"], tmp_path / "x.png")


def test_confusion_png_size_and_identical_bytes(tmp_path: Path) -> None:
    conf = np.array([[50, 3, 0], [5, 40, 2], [0, 7, 9]])
    names = ["sky", "road", "car"]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    confusion_png(conf, names, a, title="identity, mIoU 70.0")
    confusion_png(conf, names, b, title="identity, mIoU 70.0")
    assert a.read_bytes() == b.read_bytes()
    assert b"Software" not in a.read_bytes()
    with Image.open(a) as img:
        assert img.size == (500, 400)  # (4 + 1) x 4 inches at 100 dpi for 3 classes
    with pytest.raises(ValueError, match="class names"):
        confusion_png(conf, names[:2], a)
