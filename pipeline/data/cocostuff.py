"""COCO-Stuff 164k with the 27 coarse classes of PiCIE and STEGO ("cocostuff27").

Official layout (images from COCO 2017, labels from `stuffthingmaps_trainval2017.zip`):

```
root/images/train2017/<id>.jpg
root/images/val2017/<id>.jpg
root/annotations/train2017/<id>.png     "L", fine label id - 1 (0..181), 255 = unlabeled
root/annotations/val2017/<id>.png
root/curated/train2017/Coco164kFull_Stuff_Coarse_7.txt   PiCIE/STEGO curated ids, one per line
root/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt
```

`image_list="curated"` (default) reads the curated lists (49,629 train and 2,175 val images
in the PiCIE release); `image_list="full"` takes every `.jpg` in `images/train2017` and
`images/val2017`. Splits are named "train" and "val".

The 182 fine ids map to 27 coarse classes with the `fine_to_coarse` table of PiCIE
(Cho et al. 2021) and STEGO (Hamilton et al. 2022, `src/data.py`): fine ids 0..90 (things)
go to coarse 0..11, fine ids 91..181 (stuff) to coarse 12..26. 255 stays 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.base import IGNORE, Dataset, Sample, check_samples, read_split_file, samples_from_ids
from pipeline.errors import DataError, ParamsError

COCOSTUFF27_CLASSES = [
    # things (fine ids 0..90)
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen",
    "accessory", "animal", "outdoor", "person", "sports", "vehicle",
    # stuff (fine ids 91..181)
    "ceiling", "floor", "food-stuff", "furniture-stuff", "raw-material", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
]  # fmt: skip

# Coarse class of each fine id 0..181 (the stuffthingmaps value, i.e. COCO-Stuff label id - 1),
# ten per row; the comment names the first fine class of the row.
FINE_TO_COARSE = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8,    # 0 person, bicycle, ..., boat, traffic light
    8, 8, 8, 8, 8, 7, 7, 7, 7, 7,            # 10 fire hydrant, ..., bench, bird, ...
    7, 7, 7, 7, 7, 6, 6, 6, 6, 6,            # 20 cow, ..., giraffe, hat, backpack, ...
    6, 6, 6, 10, 10, 10, 10, 10, 10, 10,     # 30 handbag, tie, suitcase, frisbee, ...
    10, 10, 10, 5, 5, 5, 5, 5, 5, 5,         # 40 skateboard, ..., bottle, plate, ...
    5, 2, 2, 2, 2, 2, 2, 2, 2, 2,            # 50 bowl, banana, ...
    2, 3, 3, 3, 3, 3, 3, 3, 3, 3,            # 60 cake, chair, ...
    3, 0, 0, 0, 0, 0, 0, 1, 1, 1,            # 70 door, tv, ..., cell phone, microwave, ...
    1, 1, 1, 4, 4, 4, 4, 4, 4, 4,            # 80 sink, refrigerator, blender, book, ...
    4, 17, 17, 22, 20, 20, 22, 15, 25, 16,   # 90 hair brush, banner, blanket, branch, bridge, ...
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15,  # 100 carpet, ceiling-other, ..., clouds, counter, ...
    21, 15, 25, 13, 13, 13, 13, 13, 22, 26,  # 110 dirt, door-stuff, fence, floor-*, flower, fog
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15,  # 120 food-other, fruit, ..., hill, house, leaves, light
    17, 16, 15, 22, 24, 21, 17, 25, 16, 21,  # 130 mat, metal, mirror-stuff, moss, mountain, ...
    17, 22, 16, 21, 21, 25, 21, 26, 21, 24,  # 140 pillow, plant-other, ..., river, road, rock
    20, 17, 14, 21, 26, 15, 23, 20, 21, 24,  # 150 roof, rug, salad, sand, sea, shelf, sky-other, ...
    15, 24, 22, 25, 15, 20, 17, 17, 22, 14,  # 160 stairs, stone, straw, ..., tree, vegetable
    18, 18, 18, 18, 18, 18, 18, 26, 26, 19,  # 170 wall-brick, ..., wall-wood, water-other, ...
    19, 24,                                  # 180 window-other, wood
)  # fmt: skip
NUM_FINE = 182
IMAGE_LISTS = ("curated", "full")
CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"
SPLIT_DIRS = {"train": "train2017", "val": "val2017"}


def cocostuff27_lut() -> np.ndarray:
    """256-entry uint8 LUT: fine id 0..181 -> coarse id 0..26, everything else -> 255."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[:NUM_FINE] = FINE_TO_COARSE
    return lut


def _all_images(root: Path, split: str, folder: str) -> list[Sample]:
    """Every `.jpg` in `images/<folder>`, sorted, with its mask in `annotations/<folder>`."""
    image_dir = root / "images" / folder
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found (cocostuff27, split {split!r})")
    ids = sorted(p.stem for p in image_dir.glob("*.jpg") if p.is_file())
    if not ids:
        raise DataError(f"{image_dir}: no .jpg images found (cocostuff27, split {split!r})")
    return samples_from_ids(ids, split, image_dir, root / "annotations" / folder, ".jpg")


def load_cocostuff27(root: Path, image_list: str = "curated") -> Dataset:
    """COCO-Stuff 164k, train and val, 27 coarse classes; `image_list` is "curated" or "full"."""
    if image_list not in IMAGE_LISTS:
        allowed = ", ".join(IMAGE_LISTS)
        raise ParamsError(f"cocostuff27: option image_list={image_list!r} is not allowed (allowed: {allowed})")
    root = Path(root)
    samples: list[Sample] = []
    for split, folder in SPLIT_DIRS.items():
        if image_list == "full":
            samples += _all_images(root, split, folder)
        else:
            ids = read_split_file(root / "curated" / folder / CURATED_LIST)
            samples += samples_from_ids(ids, split, root / "images" / folder, root / "annotations" / folder, ".jpg")
    return Dataset("cocostuff27", check_samples(samples), list(COCOSTUFF27_CLASSES), cocostuff27_lut())
