"""Pictures to look at: coloured label maps, overlays, image grids, confusion heatmaps.

Every writer is deterministic (same inputs, same bytes: no timestamps or software tags in
the PNGs) and writes to a temporary file in the target folder, then ``os.replace``s it.
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.artifacts import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

IGNORE_INDEX = 255
_VOC_COLORS = 255  # the PASCAL VOC bit-interleaved palette is distinct for ids 1..255


def palette(n: int) -> np.ndarray:
    """Distinct, deterministic colours for ids 0..n-1.

    Ids 0..254 take entries 1..255 of the PASCAL VOC palette (entry 0, black, is skipped:
    black is reserved for ignored pixels, id 255, in :func:`colorize`). Ids beyond use
    golden-ratio hue steps.

    Args:
        n: Number of colours.

    Returns:
        uint8 array (n, 3).
    """
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    ids = np.arange(1, min(n, _VOC_COLORS) + 1)
    colors = _voc_colors(ids)
    extra = [_golden_color(i) for i in range(_VOC_COLORS, n)]
    if extra:
        colors = np.concatenate([colors, np.array(extra, dtype=np.uint8)])
    return colors.reshape(n, 3)


def _voc_colors(ids: np.ndarray) -> np.ndarray:
    """PASCAL VOC palette entries: the bits of the id spread over R, G, B from the top bit down."""
    out = np.zeros((ids.size, 3), dtype=np.int64)
    c = ids.astype(np.int64).copy()
    for shift in range(7, -1, -1):
        for channel in range(3):
            out[:, channel] |= ((c >> channel) & 1) << shift
        c >>= 3
    return out.astype(np.uint8)


def _golden_color(i: int) -> tuple[int, int, int]:
    """A saturated colour whose hue steps by the golden ratio with i."""
    hue = (i * 0.618033988749895) % 1.0
    value = 0.65 + 0.35 * ((i * 7) % 3) / 2
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def colorize(label_map: np.ndarray) -> np.ndarray:
    """Colour a label map with :func:`palette`; 255 (ignore) is drawn black.

    Args:
        label_map: (H, W) non-negative integer ids.

    Returns:
        uint8 RGB (H, W, 3).
    """
    labels = np.asarray(label_map)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label map must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"label map has a negative id {labels.min()}")
    top = int(labels.max()) + 1 if labels.size else 0
    lut = palette(max(top, IGNORE_INDEX + 1))
    lut[IGNORE_INDEX] = 0
    return lut[labels]


def overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a coloured label map over an image; ignored pixels (255) keep the image.

    Args:
        image: uint8 RGB (H, W, 3) (a grey (H, W) image is expanded).
        label_map: (H, W) integer ids.
        alpha: Weight of the label colours, in [0, 1].

    Returns:
        uint8 RGB (H, W, 3).
    """
    img = _as_rgb(image)
    labels = np.asarray(label_map)
    if img.shape[:2] != labels.shape:
        raise ValueError(f"image size {img.shape[:2]} differs from label map size {labels.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    blend = (1.0 - alpha) * img.astype(np.float32) + alpha * colorize(labels).astype(np.float32)
    blend = np.where((labels == IGNORE_INDEX)[..., None], img, np.rint(blend))
    return blend.astype(np.uint8)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Validate a uint8 image and return it as (H, W, 3)."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {img.shape}")
    return img


def overlay_grid(
    rows: list[list[np.ndarray]],
    titles: list[str],
    out_path: Path,
    tile_height: int = 160,
) -> None:
    """Write a PNG grid of tiles with titled columns (e.g. image | GT | prediction per row).

    A tile is an RGB uint8 (H, W, 3) image, resized bilinearly, or a 2-D integer label
    map, coloured with :func:`colorize` and resized by nearest neighbour (so a grey
    image must come as (H, W, 3)). Tiles are scaled
    to ``tile_height`` keeping their aspect ratio; a column is as wide as its widest tile.

    Args:
        rows: Rows of tiles, all rows with ``len(titles)`` tiles.
        titles: One title per column.
        out_path: PNG file to write (its folder must exist).
        tile_height: Height of every tile in pixels.
    """
    if not rows:
        raise ValueError("overlay_grid needs at least one row")
    if tile_height < 1:
        raise ValueError(f"tile_height must be >= 1, got {tile_height}")
    for i, row in enumerate(rows):
        if len(row) != len(titles):
            raise ValueError(f"row {i} has {len(row)} tiles but there are {len(titles)} titles")
    tiles = [[_tile(t, tile_height) for t in row] for row in rows]
    canvas = _compose_grid(tiles, titles, tile_height)
    write_png(canvas, Path(out_path))


_PAD = 4
_TITLE_HEIGHT = 20


def _tile(array: np.ndarray, height: int) -> Image.Image:
    """One grid tile: colour label maps, then resize to ``height`` keeping the aspect ratio."""
    arr = np.asarray(array)
    if arr.ndim == 2:
        img = Image.fromarray(colorize(arr))
        resample = Image.Resampling.NEAREST
    else:
        img = Image.fromarray(_as_rgb(arr))
        resample = Image.Resampling.BILINEAR
    width = max(1, round(img.width * height / img.height))
    return img.resize((width, height), resample=resample)


def _compose_grid(tiles: list[list[Image.Image]], titles: list[str], height: int) -> Image.Image:
    """Paste tiles on a white canvas under a row of centred column titles."""
    widths = [max(row[j].width for row in tiles) for j in range(len(titles))]
    total_w = sum(widths) + _PAD * (len(widths) + 1)
    total_h = _TITLE_HEIGHT + len(tiles) * (height + _PAD) + _PAD
    canvas = Image.new("RGB", (total_w, total_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x = _PAD
    for j, (title, width) in enumerate(zip(titles, widths)):
        left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
        origin = (x + (width - (right - left)) // 2, (_TITLE_HEIGHT - (bottom - top)) // 2 - top)
        draw.text(origin, title, fill=(0, 0, 0), font=font)
        for i, row in enumerate(tiles):
            canvas.paste(row[j], (x, _TITLE_HEIGHT + i * (height + _PAD)))
        x += width + _PAD
    return canvas


def write_png(image: Image.Image, out_path: Path) -> None:
    """Save a PNG without metadata through a temporary file and ``os.replace``."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    atomic_write_bytes(out_path, buf.getvalue())


def confusion_png(
    conf: np.ndarray,
    class_names: Sequence[str],
    out_path: Path,
    title: str | None = None,
) -> None:
    """Write a heatmap of a class confusion matrix, each GT class's row normalised to 1.

    The image shows GT classes as rows and predicted classes as columns (the usual
    reading), so row ``g`` reads "where the pixels of class g went"; cells hold
    percentages when there are at most 30 classes.

    Args:
        conf: (C, C) class confusion after matching, rows = predicted, cols = GT (as
            ``MatchResult.class_confusion``).
        class_names: C names.
        out_path: PNG file to write (its folder must exist).
        title: Optional figure title (e.g. the method and mIoU).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(conf, dtype=np.float64)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {n} class names")
    by_gt = cm.T  # rows = GT, cols = predicted
    totals = by_gt.sum(axis=1, keepdims=True)
    norm = np.divide(by_gt, totals, out=np.zeros_like(by_gt), where=totals > 0)

    side = max(4.0, 0.45 * n + 2.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of GT pixels")
    ax.set_xticks(range(n), labels=list(class_names), rotation=90)
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("GT class")
    if title:
        ax.set_title(title)
    if n <= 30:
        _annotate_cells(ax, norm)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    atomic_write_bytes(out_path, buf.getvalue())


def _annotate_cells(ax: Axes, norm: np.ndarray) -> None:
    """Write each cell's percentage, white on dark cells."""
    n = norm.shape[0]
    fontsize = 8 if n <= 12 else 6
    for g in range(n):
        for p in range(n):
            value = norm[g, p]
            if value < 0.005:
                continue
            color = "white" if value > 0.5 else "black"
            ax.text(p, g, f"{100 * value:.0f}", ha="center", va="center", color=color, fontsize=fontsize)
