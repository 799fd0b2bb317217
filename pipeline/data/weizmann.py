"""Weizmann Horses: one horse per image, binary figure/ground masks.

Layout (see `../shared/data/weizmann_horse/README.md`):

```
root/images/<id>.png      RGB, varying sizes
root/masks/<id>.png       "L", 0 = background, 255 = horse (foreground, NOT ignore)
root/splits/train.txt     246 ids
root/splits/val.txt       81 ids
```

255 is mapped to class 1 (horse). Any other stored value is not a label of this dataset:
it maps to 254, which `Dataset.validate` reports as out of range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.base import Dataset, check_samples, read_split_file, samples_from_ids

WEIZMANN_CLASSES = ["background", "horse"]


def load_weizmann(root: Path) -> Dataset:
    """Weizmann Horses, train and val splits, classes background (0) and horse (1)."""
    root = Path(root)
    samples = []
    for split in ("train", "val"):
        ids = read_split_file(root / "splits" / f"{split}.txt")
        samples += samples_from_ids(ids, split, root / "images", root / "masks", ".png")
    lut = np.full(256, 254, dtype=np.uint8)
    lut[0], lut[255] = 0, 1
    return Dataset("weizmann_horse", check_samples(samples), list(WEIZMANN_CLASSES), lut)
