"""The embedded synthetic dataset: procedural shapes with textures on cluttered backgrounds.

Each object category is defined by its SHAPE and its TEXTURE together; colour is drawn per
object from the same distribution as the background clutter, so colour never gives the
class away. 1-3 objects per image, later ones drawn over earlier ones (occlusion), on a
smooth multi-colour background with fine grain noise, small blobs and lines.

Layout written by `generate_synthetic(root, seed)`:

```
root/images/<id>.png      RGB uint8, size x size
root/masks/<id>.png       "L": 0 = background, 1..6 = object class (see classes.txt)
root/instances/<id>.png   "L": 0 = background, 1..n visible objects in drawing order
root/splits/train.txt     ids, one per line
root/splits/val.txt
root/classes.txt          class names in id order, background first
root/generator.json       the generator's arguments and version
```

The same arguments give byte-identical files: every image draws from its own
`numpy.random.Generator`, spawned from `SeedSequence(seed)`, and PIL writes PNG
deterministically.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.artifacts import staged_folder
from pipeline.data.base import Dataset, Sample, check_samples, read_gray, read_split_file, samples_from_ids
from pipeline.errors import DataError, ParamsError

GENERATOR_VERSION = 1

CLASS_NAMES = [
    "background",
    "striped_disc",
    "checkered_triangle",
    "dotted_star",
    "noisy_ring",
    "wavy_cross",
    "grid_square",
]
"""Class names in id order; object class k is (shape, texture) number k."""

_SHAPES = ["disc", "triangle", "star", "ring", "cross", "square"]
_TEXTURES = ["stripes", "checker", "dots", "noise", "waves", "grid"]

# Object diameter as a fraction of the image side: 56-125 px at 224 px (4-9 ViT patches of 14 px),
# times the shape's size factor below.
_MIN_OBJECT, _MAX_OBJECT = 0.25, 0.56
# Thin shapes are drawn larger so that every class covers a similar share of pixels:
# radius factor = (disc area / shape area at the same radius) ** 0.4.
_SIZE_FACTOR = {"disc": 1.0, "triangle": 1.42, "star": 1.41, "ring": 1.16, "cross": 1.14, "square": 1.11}
# Each earlier object keeps at least this fraction of its own area visible.
_MIN_VISIBLE = 0.4


def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n colours (n, 3) float in 0..255, uniform in the RGB cube: the one colour distribution
    shared by objects and background clutter."""
    return rng.uniform(0.0, 255.0, size=(n, 3))


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two colours far enough apart for a texture to be visible."""
    a = _colours(rng, 1)[0]
    cands = _colours(rng, 16)
    ok = np.linalg.norm(cands - a, axis=1) >= 130.0
    b = cands[int(np.argmax(ok))] if ok.any() else 255.0 - a
    return a, b


def _background(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Smooth multi-colour field + fine grain noise + random small blobs and line segments."""
    g = int(rng.integers(3, 6))
    field = _colours(rng, g * g).reshape(g, g, 3).astype(np.float32)
    img = cv2.resize(field, (size, size), interpolation=cv2.INTER_CUBIC)
    grain = rng.standard_normal((size, size)).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), sigmaX=max(0.8, 1.5 * scale))
    grain *= 18.0 / max(float(grain.std()), 1e-6)
    img += grain[:, :, None]
    for _ in range(int(rng.integers(15, 36))):
        c = tuple(float(v) for v in _colours(rng, 1)[0])
        centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        axes = (max(1, int(rng.uniform(3, 12) * scale)), max(1, int(rng.uniform(3, 12) * scale)))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, c, thickness=-1)
    for _ in range(int(rng.integers(4, 13))):
        c = tuple(float(v) for v in _colours(rng, 1)[0])
        x0, y0 = rng.uniform(0, size, 2)
        ang, length = rng.uniform(0, np.pi), rng.uniform(10, 60) * scale
        p0 = (int(x0), int(y0))
        p1 = (int(x0 + length * np.cos(ang)), int(y0 + length * np.sin(ang)))
        cv2.line(img, p0, p1, c, thickness=max(1, int(rng.integers(1, 4) * scale + 0.5)))
    return img


def _polygon(kind: str, radius: float) -> np.ndarray:
    """Vertices (n, 2) of a polygon shape centred on 0, before rotation."""
    if kind == "triangle":
        a = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
        return radius * np.stack([np.cos(a), np.sin(a)], 1)
    if kind == "square":
        h = 0.78 * radius
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if kind == "star":
        a = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if kind == "cross":
        w, L = 0.34 * radius, radius
        return np.array(
            [[-w, -L], [w, -L], [w, -w], [L, -w], [L, w], [w, w], [w, L], [-w, L], [-w, w], [-L, w], [-L, -w], [-w, -w]]
        )
    raise ValueError(kind)


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, radius: float, theta: float, offset: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape on a local grid; (u, v) are rotated coordinates from the centre."""
    if kind == "disc":
        return u * u + v * v <= radius * radius
    if kind == "ring":
        r2 = u * u + v * v
        return (r2 <= radius * radius) & (r2 >= (0.55 * radius) ** 2)
    pts = _polygon(kind, radius)
    c, s = np.cos(theta), np.sin(theta)
    pts = pts @ np.array([[c, s], [-s, c]]) + offset  # rotate, then to local pixel coordinates
    canvas = np.zeros(u.shape, np.uint8)
    cv2.fillPoly(canvas, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Boolean pattern on the object's rotated grid: True pixels take the second colour."""
    p = max(4.0, rng.uniform(8.0, 14.0) * scale)
    if kind == "stripes":
        return np.mod(u / p, 1.0) < 0.5
    if kind == "checker":
        return (np.floor(u / (0.8 * p)) + np.floor(v / (0.8 * p))) % 2 == 1
    if kind == "dots":
        du, dv = np.mod(u, p) - p / 2, np.mod(v, p) - p / 2
        return du * du + dv * dv < (0.3 * p) ** 2
    if kind == "noise":
        b = max(1, int(round(rng.uniform(2.0, 4.0) * scale)))
        h, w = u.shape
        cells = rng.random((h // b + 1, w // b + 1)) < 0.5
        return np.repeat(np.repeat(cells, b, 0), b, 1)[:h, :w]
    if kind == "waves":
        q, amp = rng.uniform(2.0, 3.0) * p, rng.uniform(1.5, 2.5)
        return np.sin(2 * np.pi * u / p + amp * np.sin(2 * np.pi * v / q)) > 0
    if kind == "grid":
        w = max(1.0, rng.uniform(2.0, 3.0) * scale) / p
        return (np.mod(u / p, 1.0) < w) | (np.mod(v / p, 1.0) < w)
    raise ValueError(kind)


def render_synthetic_image(rng: np.random.Generator, size: int = 224) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic image with its semantic and instance masks.

    Returns:
        image (size, size, 3) uint8, semantic mask (size, size) uint8 with 0 = background and
        1..6 the classes of `CLASS_NAMES`, instance mask (size, size) uint8 with 0 = background
        and 1..n the visible objects (n in 1..3) in drawing order.
    """
    scale = size / 224.0
    img = _background(rng, size, scale)
    inst = np.zeros((size, size), np.uint8)
    sem = np.zeros((size, size), np.uint8)
    areas: list[int] = []
    n_wanted = int(rng.integers(1, 4))
    for _ in range(n_wanted):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        a, b = _colour_pair(rng)
        for _try in range(20):
            radius = 0.5 * size * rng.uniform(_MIN_OBJECT, _MAX_OBJECT) * _SIZE_FACTOR[_SHAPES[cls - 1]]
            ext = int(np.ceil(1.12 * radius)) + 1
            cx, cy = rng.uniform(ext, size - ext, 2) if size - ext > ext else (size / 2, size / 2)
            theta = rng.uniform(0, 2 * np.pi)
            x0, y0 = max(0, int(cx) - ext), max(0, int(cy) - ext)
            x1, y1 = min(size, int(cx) + ext + 1), min(size, int(cy) + ext + 1)
            ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            dx, dy = xs - cx, ys - cy
            c, s = np.cos(theta), np.sin(theta)
            u, v = c * dx + s * dy, -s * dx + c * dy
            m = _shape_mask(_SHAPES[cls - 1], u, v, radius, theta, np.array([cx - x0, cy - y0]))
            covered = inst[y0:y1, x0:x1][m]
            if areas and covered.any():
                lost = np.bincount(covered, minlength=len(areas) + 1)[1:]
                visible = np.bincount(inst.ravel(), minlength=len(areas) + 1)[1:]
                if np.any(visible - lost < _MIN_VISIBLE * np.array(areas)):
                    continue
            break
        else:
            continue  # no placement keeps the earlier objects visible enough: skip this one
        t = _texture(_TEXTURES[cls - 1], u, v, rng, scale)
        patch = np.where(t[:, :, None], b.astype(np.float32), a.astype(np.float32))
        region = img[y0:y1, x0:x1]
        region[m] = patch[m]
        inst[y0:y1, x0:x1][m] = len(areas) + 1
        sem[y0:y1, x0:x1][m] = cls
        areas.append(int(m.sum()))
    img += rng.normal(0.0, 3.0, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), sem, inst


def generate_synthetic(
    root: Path, seed: int, num_images: int = 300, size: int = 224, val_fraction: float = 0.33
) -> None:
    """Write the synthetic dataset to `root` (see the module docstring for the layout).

    The dataset is built in a temporary sibling folder and moved into place at the end, so
    an interrupted run leaves no half-written dataset. An existing `root` is replaced only
    if it is a synthetic dataset itself (it has `generator.json`) or empty.

    Raises:
        DataError: if `root` holds something other than a synthetic dataset.
        ParamsError: for `num_images` < 1, `size` < 32, or `val_fraction` outside [0, 1).
    """
    root = Path(root)
    for key, value, ok, allowed in (
        ("num_images", num_images, num_images >= 1, ">= 1"),
        ("size", size, size >= 32, ">= 32"),
        ("val_fraction", val_fraction, 0.0 <= val_fraction < 1.0, "in [0, 1)"),
    ):
        if not ok:
            raise ParamsError(f"synthetic dataset: {key}={value!r} is not allowed (must be {allowed})")
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / "generator.json").is_file())):
        raise DataError(f"{root}: exists and is not a synthetic dataset (no generator.json); refusing to overwrite")
    with staged_folder(root) as tmp:
        _write_synthetic(tmp, seed, num_images, size, val_fraction)


def _write_synthetic(tmp: Path, seed: int, num_images: int, size: int, val_fraction: float) -> None:
    for sub in ("images", "masks", "instances", "splits"):
        (tmp / sub).mkdir(parents=True)
    from pipeline.progress import track

    width = max(5, len(str(num_images - 1)))
    ids = [f"{i:0{width}d}" for i in range(num_images)]
    seqs = np.random.SeedSequence(seed).spawn(num_images + 1)
    for i in track(range(num_images), description="generating synthetic images"):
        img, sem, inst = render_synthetic_image(np.random.default_rng(seqs[i]), size)
        Image.fromarray(img, "RGB").save(tmp / "images" / f"{ids[i]}.png", format="PNG")
        Image.fromarray(sem, "L").save(tmp / "masks" / f"{ids[i]}.png", format="PNG")
        Image.fromarray(inst, "L").save(tmp / "instances" / f"{ids[i]}.png", format="PNG")
    n_val = int(round(num_images * val_fraction))
    if num_images > 1:
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), num_images - 1)
    val = set(np.random.default_rng(seqs[-1]).permutation(num_images)[:n_val].tolist())
    (tmp / "splits" / "train.txt").write_text("".join(f"{ids[i]}\n" for i in range(num_images) if i not in val))
    (tmp / "splits" / "val.txt").write_text("".join(f"{ids[i]}\n" for i in range(num_images) if i in val))
    (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in CLASS_NAMES))
    meta = dict(version=GENERATOR_VERSION, seed=seed, num_images=num_images, size=size, val_fraction=val_fraction)
    (tmp / "generator.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_instances(sample: Sample) -> np.ndarray:
    """Instance mask of a synthetic sample, uint8 (H, W): 0 = background, 1..n objects.

    Read from `root/instances/<id>.png`, beside the sample's `images/` folder.
    """
    return read_gray(Path(sample.image).parent.parent / "instances" / f"{sample.id}.png")


def load_synthetic(root: Path) -> Dataset:
    """Load a dataset written by `generate_synthetic`."""
    root = Path(root)
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise DataError(f"{classes_file}: not found: generate the synthetic dataset first (the `synth` stage)")
    class_names = read_split_file(classes_file)
    samples = []
    for split in ("train", "val"):
        ids = read_split_file(root / "splits" / f"{split}.txt")
        samples += samples_from_ids(ids, split, root / "images", root / "masks", ".png")
    return Dataset("synthetic", check_samples(samples), class_names)
