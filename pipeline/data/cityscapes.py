"""Cityscapes (fine annotations) with the 27 classes of STEGO and TransFGU ("cityscapes27").

Official layout (`leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip`):

```
root/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png    RGB, 2048x1024
root/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png      "L", labelIds 0..33
```

Splits "train" (2975 images) and "val" (500), sorted by path; the sample id is the file
stem without `_leftImg8bit`, e.g. "aachen_000000_000019". The test split is not loaded
(its public labels are empty).

The 27 classes are the labelIds 7 (road) .. 33 (bicycle) in order, i.e. labelId - 7, as in
STEGO (`CityscapesSeg`: target - first_nonvoid, first_nonvoid = 7) and TransFGU. labelIds
0..6 (unlabeled, ego vehicle, rectification border, out of roi, static, dynamic, ground),
-1 (license plate, 255 as uint8) and anything above 33 map to 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.base import IGNORE, Dataset, Sample, check_samples
from pipeline.errors import DataError

CITYSCAPES27_CLASSES = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
]  # fmt: skip
FIRST_LABEL_ID = 7  # "road": labelIds below it are void
IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"
SPLITS = ("train", "val")


def cityscapes27_lut() -> np.ndarray:
    """256-entry uint8 LUT: labelId 7..33 -> 0..26, everything else -> 255."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    n = len(CITYSCAPES27_CLASSES)
    lut[FIRST_LABEL_ID : FIRST_LABEL_ID + n] = np.arange(n, dtype=np.uint8)
    return lut


def _split_samples(root: Path, split: str) -> list[Sample]:
    """Every `<city>/*_leftImg8bit.png` of one split, sorted, with its gtFine labelIds mask."""
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found (cityscapes27, split {split!r})")
    images = sorted(p for p in image_dir.glob(f"*/*{IMAGE_SUFFIX}") if p.is_file())
    if not images:
        raise DataError(f"{image_dir}: no <city>/*{IMAGE_SUFFIX} images found (cityscapes27, split {split!r})")
    samples = []
    for path in images:
        stem = path.name[: -len(IMAGE_SUFFIX)]
        mask = root / "gtFine" / split / path.parent.name / f"{stem}{MASK_SUFFIX}"
        samples.append(Sample(stem, path, mask, split))
    return samples


def load_cityscapes27(root: Path) -> Dataset:
    """Cityscapes gtFine, train and val splits, the 27 classes labelId 7..33."""
    root = Path(root)
    samples = [s for split in SPLITS for s in _split_samples(root, split)]
    return Dataset("cityscapes27", check_samples(samples), list(CITYSCAPES27_CLASSES), cityscapes27_lut())
