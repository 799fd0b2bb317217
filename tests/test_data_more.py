"""COCO-Stuff-27 and Cityscapes-27 loaders on tiny fixtures in each dataset's official layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from test_data import SHARED, _gray, _mask, _rgb

from pipeline.data import DATASETS, IGNORE, dataset_options, get_dataset
from pipeline.data.cityscapes import CITYSCAPES27_CLASSES
from pipeline.data.cocostuff import COCOSTUFF27_CLASSES, CURATED_LIST, FINE_TO_COARSE, cocostuff27_lut
from pipeline.errors import DataError, ParamsError

# ---------------------------------------------------------------- COCO-Stuff 27

COCO_TRAIN = ["000000000009", "000000000025"]
COCO_VAL = ["000000000139", "000000000285"]
COCO_UNCURATED = "000000000030"  # in images/train2017 but not in the curated list

# stuffthingmaps values (COCO-Stuff label id - 1) and their coarse class in the 27-class set
COCO_KNOWN = {
    0: COCOSTUFF27_CLASSES.index("person"),  # person
    2: COCOSTUFF27_CLASSES.index("vehicle"),  # car
    16: COCOSTUFF27_CLASSES.index("animal"),  # cat
    51: COCOSTUFF27_CLASSES.index("food-things"),  # banana
    71: COCOSTUFF27_CLASSES.index("electronic"),  # tv
    90: COCOSTUFF27_CLASSES.index("indoor"),  # hair brush (last thing id)
    97: COCOSTUFF27_CLASSES.index("furniture-stuff"),  # cabinet
    101: COCOSTUFF27_CLASSES.index("ceiling"),  # ceiling-other
    119: COCOSTUFF27_CLASSES.index("water"),  # fog (water in PiCIE/STEGO)
    123: COCOSTUFF27_CLASSES.index("plant"),  # grass
    148: COCOSTUFF27_CLASSES.index("ground"),  # road
    156: COCOSTUFF27_CLASSES.index("sky"),  # sky-other
    172: COCOSTUFF27_CLASSES.index("wall"),  # wall-other
    180: COCOSTUFF27_CLASSES.index("window"),  # window-other
    181: COCOSTUFF27_CLASSES.index("solid"),  # wood (last stuff id)
    182: IGNORE,  # not a COCO-Stuff id
    254: IGNORE,
    255: IGNORE,  # unlabeled
}


def _coco_layout(root: Path) -> Path:
    """images/{train2017,val2017}/<id>.jpg, annotations/.../<id>.png, curated/.../Coco164kFull_Stuff_Coarse_7.txt."""
    for folder, ids in (("train2017", COCO_TRAIN + [COCO_UNCURATED]), ("val2017", COCO_VAL)):
        for i in ids:
            _rgb(root / "images" / folder / f"{i}.jpg", fmt="JPEG")
            _gray(root / "annotations" / folder / f"{i}.png", _mask(list(COCO_KNOWN)))
    for folder, ids in (("train2017", COCO_TRAIN), ("val2017", COCO_VAL)):
        (root / "curated" / folder).mkdir(parents=True)
        (root / "curated" / folder / CURATED_LIST).write_text("".join(f"{i}\n" for i in ids))
    return root


@pytest.fixture
def cocostuff(tmp_path) -> Path:
    return _coco_layout(tmp_path / "cocostuff")


def test_cocostuff27_curated(cocostuff):
    ds = get_dataset("cocostuff27", cocostuff)
    assert ds.name == "cocostuff27" and ds.num_classes == 27
    assert ds.class_names[:2] == ["electronic", "appliance"] and ds.class_names[-1] == "water"
    assert [s.id for s in ds.split("train")] == COCO_TRAIN and [s.id for s in ds.split("val")] == COCO_VAL
    s = ds.split("val")[0]
    assert s.image == cocostuff / "images" / "val2017" / "000000000139.jpg"
    assert s.mask == cocostuff / "annotations" / "val2017" / "000000000139.png"
    assert ds.load_image(s).shape == (30, 40, 3)
    row = ds.load_mask(s)[0, : len(COCO_KNOWN)]
    assert dict(zip(COCO_KNOWN, row.tolist())) == COCO_KNOWN
    ds.validate(progress=False)


def test_cocostuff27_full(cocostuff):
    ds = get_dataset("cocostuff27", cocostuff, image_list="full")
    assert [s.id for s in ds.split("train")] == sorted(COCO_TRAIN + [COCO_UNCURATED])
    assert [s.id for s in ds.split("val")] == COCO_VAL and ds.num_classes == 27
    ds.validate(progress=False)


def test_cocostuff27_mapping_table():
    """The PiCIE/STEGO fine_to_coarse table: 182 fine ids, things -> 0..11, stuff -> 12..26."""
    assert len(FINE_TO_COARSE) == 182 and len(set(COCOSTUFF27_CLASSES)) == 27
    assert set(FINE_TO_COARSE[:91]) == set(range(12)) and set(FINE_TO_COARSE[91:]) == set(range(12, 27))
    assert [sum(c == k for c in FINE_TO_COARSE) for k in (9, 11, 23, 26)] == [1, 8, 2, 5]  # person, vehicle, sky, water
    lut = cocostuff27_lut()
    assert lut.shape == (256,) and lut.dtype == np.uint8
    assert list(lut[:182]) == list(FINE_TO_COARSE) and (lut[182:] == IGNORE).all()


def test_cocostuff27_missing_curated_list(cocostuff):
    (cocostuff / "curated" / "val2017" / CURATED_LIST).unlink()
    with pytest.raises(DataError, match=r"curated/val2017/Coco164kFull_Stuff_Coarse_7\.txt"):
        get_dataset("cocostuff27", cocostuff)
    assert len(get_dataset("cocostuff27", cocostuff, image_list="full").split("val")) == 2  # lists unused


@pytest.mark.parametrize("image_list", ["curated", "full"])
def test_cocostuff27_missing_mask(cocostuff, image_list):
    (cocostuff / "annotations" / "train2017" / "000000000025.png").unlink()
    with pytest.raises(DataError, match=r"annotations/train2017/000000000025\.png"):
        get_dataset("cocostuff27", cocostuff, image_list=image_list)


def test_cocostuff27_missing_image(cocostuff):
    (cocostuff / "images" / "val2017" / "000000000285.jpg").unlink()
    with pytest.raises(DataError, match=r"images/val2017/000000000285\.jpg"):
        get_dataset("cocostuff27", cocostuff)


def test_cocostuff27_full_without_image_folder(tmp_path):
    root = _coco_layout(tmp_path / "coco")
    for p in (root / "images" / "val2017").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"images/val2017: no \.jpg"):
        get_dataset("cocostuff27", root, image_list="full")
    (root / "images" / "val2017").rmdir()
    with pytest.raises(DataError, match=r"images/val2017: image folder not found"):
        get_dataset("cocostuff27", root, image_list="full")


def test_cocostuff27_bad_option(cocostuff):
    with pytest.raises(ParamsError, match=r"image_list='all'.*curated, full"):
        get_dataset("cocostuff27", cocostuff, image_list="all")


# ---------------------------------------------------------------- Cityscapes 27

CITY_TRAIN = ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"]
CITY_VAL = ["frankfurt_000000_000294", "lindau_000000_000019"]

# labelIds and their class in the 27-class set (labelId - 7; void below 7 and above 33)
CITY_KNOWN = {
    0: IGNORE,  # unlabeled
    1: IGNORE,  # ego vehicle
    6: IGNORE,  # ground
    7: CITYSCAPES27_CLASSES.index("road"),
    8: CITYSCAPES27_CLASSES.index("sidewalk"),
    11: CITYSCAPES27_CLASSES.index("building"),
    18: CITYSCAPES27_CLASSES.index("polegroup"),
    23: CITYSCAPES27_CLASSES.index("sky"),
    24: CITYSCAPES27_CLASSES.index("person"),
    26: CITYSCAPES27_CLASSES.index("car"),
    33: CITYSCAPES27_CLASSES.index("bicycle"),
    34: IGNORE,
    255: IGNORE,  # license plate (-1)
}


def _city_layout(root: Path) -> Path:
    """leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png and gtFine/<split>/<city>/<stem>_gtFine_*.png."""
    for split, stems in (("train", CITY_TRAIN), ("val", CITY_VAL)):
        for stem in stems:
            city = stem.split("_")[0]
            _rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            gt = root / "gtFine" / split / city
            _gray(gt / f"{stem}_gtFine_labelIds.png", _mask(list(CITY_KNOWN)))
            _gray(gt / f"{stem}_gtFine_instanceIds.png", _mask([0, 26, 99]))  # decoys: never read
            _rgb(gt / f"{stem}_gtFine_color.png")
            (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
    return root


@pytest.fixture
def cityscapes(tmp_path) -> Path:
    return _city_layout(tmp_path / "cityscapes")


def test_cityscapes27(cityscapes):
    ds = get_dataset("cityscapes27", cityscapes)
    assert ds.name == "cityscapes27" and ds.num_classes == 27
    assert ds.class_names[0] == "road" and ds.class_names[19] == "car" and ds.class_names[26] == "bicycle"
    assert [s.id for s in ds.split("train")] == CITY_TRAIN and [s.id for s in ds.split("val")] == CITY_VAL
    s = ds.split("train")[2]
    assert s.image == cityscapes / "leftImg8bit" / "train" / "bochum" / "bochum_000000_000313_leftImg8bit.png"
    assert s.mask == cityscapes / "gtFine" / "train" / "bochum" / "bochum_000000_000313_gtFine_labelIds.png"
    row = ds.load_mask(s)[0, : len(CITY_KNOWN)]
    assert dict(zip(CITY_KNOWN, row.tolist())) == CITY_KNOWN
    assert CITY_KNOWN[7] == 0 and CITY_KNOWN[26] == 19 and CITY_KNOWN[0] == CITY_KNOWN[1] == IGNORE
    ds.validate(progress=False)


def test_cityscapes27_missing_mask(cityscapes):
    (cityscapes / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match=r"gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds\.png"):
        get_dataset("cityscapes27", cityscapes)


def test_cityscapes27_missing_split(cityscapes):
    for p in (cityscapes / "leftImg8bit" / "val").rglob("*.png"):
        p.unlink()
    with pytest.raises(DataError, match=r"leftImg8bit/val: no <city>/\*_leftImg8bit\.png"):
        get_dataset("cityscapes27", cityscapes)
    for city in (cityscapes / "leftImg8bit" / "val").iterdir():
        city.rmdir()
    (cityscapes / "leftImg8bit" / "val").rmdir()
    with pytest.raises(DataError, match=r"leftImg8bit/val: image folder not found"):
        get_dataset("cityscapes27", cityscapes)


def test_cityscapes27_takes_no_options(cityscapes):
    with pytest.raises(ParamsError, match="'image_list'"):
        get_dataset("cityscapes27", cityscapes, image_list="full")


# ---------------------------------------------------------------- registry and real data


def test_registry_has_both():
    assert {"cocostuff27", "cityscapes27"} <= set(DATASETS)
    assert dataset_options("cocostuff27") == {"image_list": "curated"}
    assert dataset_options("cityscapes27") == {}


@pytest.mark.parametrize(
    "name, folder, n_train, n_val",
    [("cocostuff27", "cocostuff", None, None), ("cityscapes27", "cityscapes", 2975, 500)],
)
def test_real_dataset_smoke(name, folder, n_train, n_val):
    root = SHARED / folder
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    ds = get_dataset(name, root)
    train, val = ds.split("train"), ds.split("val")
    assert ds.num_classes == 27 and train and val
    if n_train is not None:
        assert (len(train), len(val)) == (n_train, n_val)
    dataclasses.replace(ds, samples=train[:2] + val[:2]).validate(progress=False)
