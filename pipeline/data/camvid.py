"""CamVid, SegNet's 11-class version (480x360).

Layout (see `../shared/data/camvid/README.md`):

```
root/images/<id>.png      RGB
root/masks/<id>.png       "L", class ids 0..10, 11 = void
root/splits/train.txt     367 ids
root/splits/val.txt       101 ids
root/splits/test.txt      optional (233 ids in the full SegNet release)
```

Void (11) is mapped to 255.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.base import Dataset, check_samples, identity_lut, read_split_file, samples_from_ids

CAMVID_CLASSES = [
    "sky", "building", "pole", "road", "pavement", "tree",
    "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
]  # fmt: skip
CAMVID_VOID = 11


def load_camvid(root: Path) -> Dataset:
    """CamVid with the train and val splits (and test when `splits/test.txt` exists)."""
    root = Path(root)
    samples = []
    for split in ("train", "val", "test"):
        path = root / "splits" / f"{split}.txt"
        if split == "test" and not path.is_file():
            continue
        samples += samples_from_ids(read_split_file(path), split, root / "images", root / "masks", ".png")
    return Dataset("camvid", check_samples(samples), list(CAMVID_CLASSES), identity_lut(void_from=[CAMVID_VOID]))
