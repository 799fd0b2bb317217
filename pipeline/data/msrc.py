"""MSRC-v2 with the Malisiewicz & Efros ground truth, 23 or 21 classes.

Layout (see `../shared/data/msrc_v2/README.md`):

```
root/images/<id>.png      RGB
root/masks/<id>.png       "L", class ids 0..22, 255 = void
root/splits/train.txt     444 ids
root/splits/val.txt       147 ids
```

`classes=21` follows the MSRC-21 convention: horse (4) and mountain (7) become void and
the other classes are renumbered 0..20 in the same order.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.base import Dataset, check_samples, identity_lut, read_split_file, samples_from_ids
from pipeline.errors import ParamsError

MSRC23_CLASSES = [
    "building", "grass", "tree", "cow", "horse", "sheep", "sky", "mountain", "aeroplane", "water", "face",
    "car", "bicycle", "flower", "sign", "bird", "book", "chair", "road", "cat", "dog", "body", "boat",
]  # fmt: skip
MSRC21_DROPPED = ("horse", "mountain")


def load_msrc(root: Path, classes: int = 23) -> Dataset:
    """MSRC-v2, train and val splits; `classes` is 23 (all) or 21 (no horse, no mountain)."""
    root = Path(root)
    if classes not in (21, 23):
        raise ParamsError(f"msrc_v2: option classes={classes!r} is not allowed (allowed: 21, 23)")
    samples = []
    for split in ("train", "val"):
        ids = read_split_file(root / "splits" / f"{split}.txt")
        samples += samples_from_ids(ids, split, root / "images", root / "masks", ".png")
    if classes == 23:
        return Dataset("msrc_v2", check_samples(samples), list(MSRC23_CLASSES), identity_lut())
    kept = [c for c in MSRC23_CLASSES if c not in MSRC21_DROPPED]
    remap = {old: (kept.index(c) if c in kept else 255) for old, c in enumerate(MSRC23_CLASSES)}
    return Dataset("msrc_v2", check_samples(samples), kept, identity_lut(to=remap))
