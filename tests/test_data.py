"""Dataset loaders on tiny fixtures in each dataset's exact layout, bad input, real-data smoke tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import DATASETS, IGNORE, get_dataset
from pipeline.data.voc import VOC_CLASSES, voc_colormap
from pipeline.errors import DataError, ParamsError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RNG = np.random.default_rng(0)


def _rgb(path: Path, w: int = 40, h: int = 30, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path, format=fmt)


def _gray(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), "L").save(path, format="PNG")


def _mask(values: list[int], w: int = 40, h: int = 30) -> np.ndarray:
    """An h x w mask cycling through `values` by column."""
    return np.tile(np.array(values, np.uint8)[np.arange(w) % len(values)], (h, 1))


def _lists(root: Path, splits: dict[str, list[str]], folder: str = "splits") -> None:
    (root / folder).mkdir(parents=True, exist_ok=True)
    for name, ids in splits.items():
        (root / folder / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))


def _simple_layout(root: Path, splits: dict[str, list[str]], mask_values: list[int]) -> Path:
    """images/<id>.png, masks/<id>.png, splits/<split>.txt: CamVid, MSRC-v2 and Weizmann."""
    for ids in splits.values():
        for i in ids:
            _rgb(root / "images" / f"{i}.png")
            _gray(root / "masks" / f"{i}.png", _mask(mask_values))
    _lists(root, splits)
    return root


@pytest.fixture
def camvid(tmp_path) -> Path:
    splits = {"train": ["0001TP_0001", "0001TP_0002"], "val": ["Seq05VD_f0"]}
    return _simple_layout(tmp_path / "camvid", splits, list(range(12)))


# ---------------------------------------------------------------- loaders


def test_camvid(camvid):
    ds = get_dataset("camvid", camvid)
    assert ds.name == "camvid" and ds.num_classes == 11 and ds.class_names[0] == "sky"
    assert [s.id for s in ds.split("train")] == ["0001TP_0001", "0001TP_0002"]
    assert len(ds.split("val")) == 1 and len(ds.split("all")) == 3
    mask = ds.load_mask(ds.samples[0])
    assert mask[0, 11] == IGNORE and mask[0, 10] == 10 and mask[0, 3] == 3
    assert ds.load_image(ds.samples[0]).shape == (30, 40, 3)
    fp = ds.validate(progress=False)
    assert fp == get_dataset("camvid", camvid).validate(progress=False)
    _rgb(camvid / "images" / "Seq05VD_f0.png")  # new pixels -> new fingerprint
    assert get_dataset("camvid", camvid).validate(progress=False) != fp
    with pytest.raises(DataError, match="no split 'test'"):
        ds.split("test")


def test_msrc_23_and_21(tmp_path):
    root = _simple_layout(tmp_path / "msrc", {"train": ["1_1_s", "1_2_s"], "val": ["1_3_s"]}, list(range(23)) + [255])
    ds = get_dataset("msrc_v2", root)
    assert ds.num_classes == 23 and ds.class_names[4] == "horse"
    assert np.array_equal(ds.load_mask(ds.samples[0])[0, :24], list(range(23)) + [255])
    ds.validate(progress=False)
    ds21 = get_dataset("msrc_v2", root, classes=21)
    assert ds21.num_classes == 21 and "horse" not in ds21.class_names and "mountain" not in ds21.class_names
    row = ds21.load_mask(ds21.samples[0])[0, :24]
    assert row[4] == IGNORE and row[7] == IGNORE and row[23] == IGNORE
    assert row[3] == 3 and row[5] == 4 and row[8] == 6 and row[22] == 20
    assert ds21.class_names[4] == "sheep" and ds21.class_names[20] == "boat"
    ds21.validate(progress=False)
    with pytest.raises(ParamsError, match="classes=22"):
        get_dataset("msrc_v2", root, classes=22)


def test_weizmann(tmp_path):
    root = _simple_layout(tmp_path / "horse", {"train": ["000", "001"], "val": ["003"]}, [0, 255])
    ds = get_dataset("weizmann_horse", root)
    assert ds.class_names == ["background", "horse"]
    assert set(np.unique(ds.load_mask(ds.samples[0]))) == {0, 1}  # 255 is the horse, not ignore
    ds.validate(progress=False)
    _gray(root / "masks" / "003.png", _mask([0, 255, 7]))
    with pytest.raises(DataError, match=r"003\.png: value 7"):
        get_dataset("weizmann_horse", root).validate(progress=False)


def _palette_png(path: Path, values: np.ndarray) -> None:
    im = Image.fromarray(values.astype(np.uint8), "P")
    im.putpalette(voc_colormap().ravel().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")


@pytest.fixture
def vocdevkit(tmp_path) -> Path:
    """VOCdevkit/VOC2012 with 3 train, 2 val and 2 more trainaug images (40x30 JPEGs)."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    train = ["2007_000032", "2007_000039", "2008_000008"]
    val = ["2007_000033", "2007_000042"]
    extra = ["2008_000123", "2009_000001"]  # only in trainaug
    for i in train + val + extra:
        _rgb(voc / "JPEGImages" / f"{i}.jpg", fmt="JPEG")
        _gray(voc / "SegmentationClassAug" / f"{i}.png", _mask([0, 12, 255]))
    for i in train + val:
        _palette_png(voc / "SegmentationClass" / f"{i}.png", _mask([0, 15, 20, 255]))
    seg = voc / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (seg / "train.txt").write_text("\n".join(train) + "\n")
    (seg / "val.txt").write_text("\n".join(val) + "\n")
    (seg / "trainval.txt").write_text("\n".join(train + val) + "\n")
    (seg / "trainaug.txt").write_text("\n".join(train + extra) + "\n")
    return tmp_path / "VOCdevkit"


def test_voc(vocdevkit):
    for root in (vocdevkit, vocdevkit / "VOC2012"):
        ds = get_dataset("voc2012", root)
        assert ds.class_names == VOC_CLASSES and ds.num_classes == 21
        assert len(ds.split("train")) == 3 and len(ds.split("val")) == 2
        s = ds.split("val")[0]
        assert s.image.suffix == ".jpg" and s.mask.parent.name == "SegmentationClass"
        # palette indices are the class ids (not the palette colours)
        assert list(ds.load_mask(s)[0, :4]) == [0, 15, 20, 255]
        ds.validate(progress=False)


def test_voc_trainaug(vocdevkit):
    ds = get_dataset("voc2012", vocdevkit, train_split="trainaug")
    train = ds.split("train")
    assert len(train) == 5 and all(s.mask.parent.name == "SegmentationClassAug" for s in train)
    assert all(s.mask.parent.name == "SegmentationClass" for s in ds.split("val"))
    assert list(ds.load_mask(train[-1])[0, :3]) == [0, 12, 255]
    ds.validate(progress=False)
    # the list may also live in SegmentationClassAug/
    voc = vocdevkit / "VOC2012"
    (voc / "ImageSets" / "Segmentation" / "trainaug.txt").rename(voc / "SegmentationClassAug" / "trainaug.txt")
    assert len(get_dataset("voc2012", voc, train_split="trainaug").split("train")) == 5
    (voc / "SegmentationClassAug" / "trainaug.txt").unlink()
    with pytest.raises(DataError, match="trainaug.txt"):
        get_dataset("voc2012", voc, train_split="trainaug")
    with pytest.raises(ParamsError, match="train_split='trainval'"):
        get_dataset("voc2012", voc, train_split="trainval")


def test_voc_trainaug_overlapping_val_is_rejected(vocdevkit):
    seg = vocdevkit / "VOC2012" / "ImageSets" / "Segmentation"
    (seg / "trainaug.txt").write_text("2007_000032\n2007_000033\n")
    with pytest.raises(DataError, match="2007_000033"):
        get_dataset("voc2012", vocdevkit, train_split="trainaug")


def test_voc_missing_jpeg(vocdevkit):
    (vocdevkit / "VOC2012" / "JPEGImages" / "2007_000042.jpg").unlink()
    with pytest.raises(DataError, match=r"2007_000042\.jpg"):
        get_dataset("voc2012", vocdevkit)


def test_voc_not_a_devkit(tmp_path):
    with pytest.raises(DataError, match="VOC2012"):
        get_dataset("voc2012", tmp_path)


def test_folder(tmp_path):
    root = tmp_path / "photos"
    _rgb(root / "b.png")
    _rgb(root / "a.JPG", fmt="JPEG")
    _rgb(root / "trip" / "day1" / "c.jpeg", fmt="JPEG")
    _rgb(root / "x.webp", fmt="WEBP")
    _rgb(root / ".thumbnails" / "a.png")
    (root / "notes.txt").write_text("not an image")
    ds = get_dataset("folder", root)
    assert [s.id for s in ds.samples] == ["a", "b", "trip/day1/c", "x"]
    assert ds.split("train") == ds.split("all") == ds.samples
    assert not ds.has_labels and ds.num_classes == 0 and all(s.mask is None for s in ds.samples)
    ds.validate(progress=False)
    _rgb(root / "a.png")
    with pytest.raises(DataError, match="'a'"):
        get_dataset("folder", root)


def test_registry():
    assert {"synthetic", "camvid", "msrc_v2", "weizmann_horse", "voc2012", "folder"} <= set(DATASETS)


# ---------------------------------------------------------------- bad input


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(DataError) as e:
        get_dataset("kitti", tmp_path)
    assert "'kitti'" in str(e.value) and "camvid" in str(e.value) and "voc2012" in str(e.value)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        get_dataset("camvid", tmp_path / "nowhere")


def test_unknown_option(camvid):
    with pytest.raises(ParamsError, match="'classes'"):
        get_dataset("camvid", camvid, classes=21)


def test_missing_split_list(camvid):
    (camvid / "splits" / "val.txt").unlink()
    with pytest.raises(DataError, match=r"val\.txt"):
        get_dataset("camvid", camvid)


def test_listed_image_missing(camvid):
    (camvid / "images" / "0001TP_0002.png").unlink()
    with pytest.raises(DataError, match=r"images/0001TP_0002\.png"):
        get_dataset("camvid", camvid)


def test_missing_mask(camvid):
    (camvid / "masks" / "Seq05VD_f0.png").unlink()
    with pytest.raises(DataError, match=r"masks/Seq05VD_f0\.png"):
        get_dataset("camvid", camvid)


def test_id_in_two_splits(camvid):
    (camvid / "splits" / "val.txt").write_text("0001TP_0001\n")
    with pytest.raises(DataError, match="0001TP_0001"):
        get_dataset("camvid", camvid)


def test_corrupt_image(camvid):
    bad = camvid / "images" / "0001TP_0002.png"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    ds = get_dataset("camvid", camvid)
    with pytest.raises(DataError, match=r"0001TP_0002\.png: cannot decode"):
        ds.validate(progress=False)


def test_truncated_png(camvid):
    path = camvid / "images" / "Seq05VD_f0.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"Seq05VD_f0\.png: cannot decode"):
        get_dataset("camvid", camvid).validate(progress=False)


def test_truncated_mask(camvid):
    path = camvid / "masks" / "Seq05VD_f0.png"
    _gray(path, RNG.integers(0, 11, (30, 40)))  # noisy, so that half the file cuts into pixel data
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"masks/Seq05VD_f0\.png: cannot decode"):
        get_dataset("camvid", camvid).validate(progress=False)


def test_size_mismatch(camvid):
    _gray(camvid / "masks" / "0001TP_0001.png", _mask([0, 1], w=41))
    with pytest.raises(DataError, match=r"0001TP_0001\.png: mask size 41x30 does not match image .* 40x30"):
        get_dataset("camvid", camvid).validate(progress=False)


def test_class_id_out_of_range(camvid):
    _gray(camvid / "masks" / "0001TP_0002.png", _mask([0, 3, 12]))
    with pytest.raises(DataError, match=r"0001TP_0002\.png: class id 12 out of range"):
        get_dataset("camvid", camvid).validate(progress=False)


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="empty"):
        get_dataset("folder", tmp_path / "empty")


def test_not_a_synthetic_dataset(tmp_path):
    with pytest.raises(DataError, match=r"classes\.txt"):
        get_dataset("synthetic", tmp_path)


# ---------------------------------------------------------------- real data in ../shared/data


@pytest.mark.parametrize(
    "name, folder, options, n_train, n_val, n_classes",
    [
        ("camvid", "camvid", {}, 367, 101, 11),
        ("msrc_v2", "msrc_v2", {}, 444, 147, 23),
        ("msrc_v2", "msrc_v2", {"classes": 21}, 444, 147, 21),
        ("weizmann_horse", "weizmann_horse", {}, 246, 81, 2),
    ],
)
def test_real_dataset_smoke(name, folder, options, n_train, n_val, n_classes):
    root = SHARED / folder
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    ds = get_dataset(name, root, **options)
    assert (len(ds.split("train")), len(ds.split("val")), ds.num_classes) == (n_train, n_val, n_classes)
    dataclasses.replace(ds, samples=ds.samples[:3]).validate(progress=False)
