"""The dataset interface every loader implements.

A dataset is a list of samples (id, image path, optional mask path, split). Images load as
uint8 RGB arrays (H, W, 3); masks as uint8 (H, W) class ids with 255 = ignore (each loader
maps its own void value to 255). `validate()` decodes every file once and raises one
`DataError` naming the file on a corrupt or missing file, a size mismatch or a class id
out of range, so that bad input is reported before any heavy work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DataError

IGNORE = 255


@dataclass(frozen=True)
class Sample:
    """One image of a dataset."""

    id: str
    image: Path
    mask: Path | None
    split: str


@dataclass
class Dataset:
    """A registered dataset: samples plus class metadata.

    Attributes:
        name: registry name, e.g. "camvid".
        samples: every sample, all splits, in a deterministic order.
        class_names: GT class names in id order (empty when the dataset has no labels).
        mask_lut: optional 256-entry uint8 lookup applied to raw mask values
            (maps the dataset's void value to 255, renumbers classes).
    """

    name: str
    samples: list[Sample]
    class_names: list[str] = field(default_factory=list)
    mask_lut: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_labels(self) -> bool:
        return bool(self.class_names) and all(s.mask is not None for s in self.samples)

    def split(self, name: str) -> list[Sample]:
        """Samples of one split ("train", "val", or "all" for every sample)."""
        if name == "all":
            return list(self.samples)
        out = [s for s in self.samples if s.split == name]
        if not out:
            splits = sorted({s.split for s in self.samples})
            raise DataError(f"dataset {self.name!r} has no split {name!r} (has: {', '.join(splits)})")
        return out

    def load_image(self, sample: Sample) -> np.ndarray:
        """RGB uint8 array (H, W, 3)."""
        return read_rgb(sample.image)

    def load_mask(self, sample: Sample) -> np.ndarray:
        """uint8 class-id array (H, W), 255 = ignore."""
        if sample.mask is None:
            raise DataError(f"{sample.id}: dataset {self.name!r} has no mask for this image")
        raw = read_gray(sample.mask)
        return self.mask_lut[raw] if self.mask_lut is not None else raw

    def validate(self, progress: bool = True) -> str:
        """Decode every file once; raise `DataError` naming the first bad file.

        Returns:
            A sha256 fingerprint over ids, splits, class names and file bytes.
        """
        from pipeline.progress import track

        if not self.samples:
            raise DataError(f"dataset {self.name!r} has no images")
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(repr(self.class_names).encode())
        for s in track(self.samples, description=f"validating {self.name}", disable=not progress):
            h.update(f"{s.id}|{s.split}".encode())
            h.update(_file_bytes(s.image))
            img = self.load_image(s)
            if s.mask is not None:
                h.update(_file_bytes(s.mask))
                mask = self.load_mask(s)
                if mask.shape != img.shape[:2]:
                    raise DataError(
                        f"{s.mask}: mask size {mask.shape[1]}x{mask.shape[0]} does not match "
                        f"image {s.image.name} size {img.shape[1]}x{img.shape[0]}"
                    )
                bad = (mask != IGNORE) & (mask >= self.num_classes)
                if bad.any():
                    raise DataError(
                        f"{s.mask}: {_bad_value(self, s, mask, bad)} out of range for {self.name!r} "
                        f"({self.num_classes} classes, 255 = ignore)"
                    )
        return h.hexdigest()


def _bad_value(dataset: Dataset, sample: Sample, mask: np.ndarray, bad: np.ndarray) -> str:
    """Describe the first out-of-range pixel: its class id and, when a LUT changed it, the file's value."""
    first = int(np.flatnonzero(bad)[0])
    mapped = int(mask.flat[first])
    if dataset.mask_lut is not None:
        raw = read_gray(sample.mask)
        if raw.shape == mask.shape and int(raw.flat[first]) != mapped:
            return f"value {int(raw.flat[first])} (class id {mapped} after mapping)"
    return f"class id {mapped}"


def _file_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image file with PIL, or raise `DataError` naming it."""
    try:
        im = Image.open(path)
        im.load()
        return im
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3), or raise `DataError` naming it."""
    return np.asarray(open_image(path).convert("RGB"))


def read_gray(path: Path) -> np.ndarray:
    """Decode a label PNG to uint8 (H, W) raw values (palette indices for "P" images)."""
    im = open_image(path)
    if im.mode not in ("L", "P"):
        im = im.convert("L")
    return np.asarray(im, dtype=np.uint8)


def read_split_file(path: Path) -> list[str]:
    """Ids listed one per line; raises `DataError` if the list file is missing."""
    try:
        return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        raise DataError(f"{path}: split list not found") from None


def samples_from_ids(
    ids: Iterable[str], split: str, image_dir: Path, mask_dir: Path | None, image_ext: str, mask_ext: str = ".png"
) -> list[Sample]:
    """Samples for a list of ids in `image_dir/<id><ext>` (and `mask_dir/<id>.png`)."""
    return [
        Sample(i, Path(image_dir) / f"{i}{image_ext}", (Path(mask_dir) / f"{i}{mask_ext}") if mask_dir else None, split)
        for i in ids
    ]


def identity_lut(void_from: Sequence[int] = (), to: dict[int, int] | None = None) -> np.ndarray:
    """A 256-entry uint8 LUT: identity, `void_from` values -> 255, `to` remaps."""
    lut = np.arange(256, dtype=np.uint8)
    for v in void_from:
        lut[v] = IGNORE
    for k, v in (to or {}).items():
        lut[k] = v
    return lut


def check_samples(samples: list[Sample]) -> list[Sample]:
    """Cheap construction-time check: unique ids, and every listed image and mask file exists.

    Raises:
        DataError: naming the missing file or the duplicated id.
    """
    seen: dict[str, str] = {}
    for s in samples:
        if s.id in seen:
            raise DataError(f"{s.image}: id {s.id!r} is listed twice (splits {seen[s.id]!r} and {s.split!r})")
        seen[s.id] = s.split
        for path in (s.image, s.mask):
            if path is not None and not Path(path).is_file():
                raise DataError(f"{path}: file not found (listed in split {s.split!r} as id {s.id!r})")
    return samples
