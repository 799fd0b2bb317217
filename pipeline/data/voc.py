"""PASCAL VOC 2012 segmentation, standard VOCdevkit layout.

`root` is the `VOC2012` folder, or a `VOCdevkit` folder that contains `VOC2012`:

```
VOC2012/JPEGImages/<id>.jpg
VOC2012/SegmentationClass/<id>.png          palette PNG: palette index = class id 0..20, 255 = void
VOC2012/ImageSets/Segmentation/train.txt    1464 ids
VOC2012/ImageSets/Segmentation/val.txt      1449 ids
```

With `train_split="trainaug"` the train split is the 10582-image augmented set (SBD,
Hariharan et al. 2011) instead:

```
VOC2012/SegmentationClassAug/<id>.png       plain grayscale PNG, class id 0..20, 255 = void
VOC2012/ImageSets/Segmentation/trainaug.txt or VOC2012/SegmentationClassAug/trainaug.txt
```

The val split always uses `SegmentationClass`. A trainaug list that shares ids with val is
rejected. Masks must be palette ("P") or grayscale PNGs holding the class ids, as
distributed; masks re-encoded as RGB colour images are not decoded (their values then fail
`validate()` as out of range).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.base import Dataset, check_samples, identity_lut, read_split_file, samples_from_ids
from pipeline.errors import DataError, ParamsError

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
TRAIN_SPLITS = ("train", "trainaug")


def voc_colormap(n: int = 256) -> np.ndarray:
    """The VOC palette (n, 3) uint8: colour of class id i is row i (255 = (224, 224, 192))."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def find_voc2012(root: Path) -> Path:
    """The VOC2012 folder: `root` itself or `root/VOC2012`."""
    root = Path(root)
    for cand in (root, root / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DataError(f"{root}: not a VOC2012 or VOCdevkit folder (no JPEGImages/ or VOC2012/JPEGImages/)")


def load_voc(root: Path, train_split: str = "train") -> Dataset:
    """VOC 2012 segmentation, train (or trainaug, labelled split "train") and val, 21 classes."""
    if train_split not in TRAIN_SPLITS:
        allowed = ", ".join(TRAIN_SPLITS)
        raise ParamsError(f"voc2012: option train_split={train_split!r} is not allowed (allowed: {allowed})")
    voc = find_voc2012(root)
    lists = voc / "ImageSets" / "Segmentation"
    images = voc / "JPEGImages"
    masks = voc / "SegmentationClass"
    if train_split == "trainaug":
        aug = voc / "SegmentationClassAug"
        candidates = [lists / "trainaug.txt", aug / "trainaug.txt"]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise DataError(f"{candidates[0]}: trainaug list not found (also looked for {candidates[1]})")
        train = samples_from_ids(read_split_file(found[0]), "train", images, aug, ".jpg")
    else:
        train = samples_from_ids(read_split_file(lists / "train.txt"), "train", images, masks, ".jpg")
    val = samples_from_ids(read_split_file(lists / "val.txt"), "val", images, masks, ".jpg")
    return Dataset("voc2012", check_samples(train + val), list(VOC_CLASSES), identity_lut())
