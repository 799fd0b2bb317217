"""The embedded synthetic dataset: determinism, content, colour independence, difficulty."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.baseline_rgbxy import rgbxy_kmeans_predict
from pipeline.data import get_dataset
from pipeline.data.synthetic import CLASS_NAMES, generate_synthetic, load_instances
from pipeline.errors import DataError
from pipeline.metrics import confusion_matrix, hungarian_match


def _md5s(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """120 images at the default 224 px (about 2 s): enough for the statistics below."""
    root = tmp_path_factory.mktemp("synth") / "synthetic"
    generate_synthetic(root, seed=0, num_images=120)
    return get_dataset("synthetic", root)


def test_deterministic_byte_identical(tmp_path):
    generate_synthetic(tmp_path / "a", seed=3, num_images=8, size=64)
    generate_synthetic(tmp_path / "b", seed=3, num_images=8, size=64)
    generate_synthetic(tmp_path / "c", seed=4, num_images=8, size=64)
    a, b, c = _md5s(tmp_path / "a"), _md5s(tmp_path / "b"), _md5s(tmp_path / "c")
    assert len(a) == 8 * 3 + 4  # images, masks, instances + 2 splits, classes.txt, generator.json
    assert a == b
    assert a["images/00000.png"] != c["images/00000.png"]


def test_layout_and_splits(tmp_path):
    generate_synthetic(tmp_path / "s", seed=1, num_images=12, size=64, val_fraction=0.25)
    ds = get_dataset("synthetic", tmp_path / "s")
    assert len(ds.split("train")) == 9 and len(ds.split("val")) == 3
    assert ds.class_names == CLASS_NAMES and ds.has_labels
    ds.validate(progress=False)
    s = ds.samples[0]
    assert ds.load_image(s).shape == (64, 64, 3) and ds.load_mask(s).shape == (64, 64)


def test_regenerate_replaces_only_a_synthetic_folder(tmp_path):
    root = tmp_path / "s"
    generate_synthetic(root, seed=1, num_images=4, size=64)
    generate_synthetic(root, seed=1, num_images=2, size=64)  # replaces: no stale images left
    assert len(list((root / "images").iterdir())) == 2
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="photos"):
        generate_synthetic(other, seed=1, num_images=2, size=64)
    assert (other / "keep.txt").read_text() == "mine"


def test_classes_and_objects_per_image(synth):
    assert synth.num_classes == len(CLASS_NAMES) >= 6 and CLASS_NAMES[0] == "background"
    seen = np.zeros(synth.num_classes, bool)
    counts, touching = [], 0
    for s in synth.samples:
        sem, inst = synth.load_mask(s), load_instances(s)
        ids = np.unique(inst[inst > 0])
        assert 1 <= len(ids) <= 3 and list(ids) == list(range(1, len(ids) + 1)), s.id
        assert np.array_equal(sem > 0, inst > 0), s.id
        for i in ids:
            assert len(np.unique(sem[inst == i])) == 1, s.id  # one class per instance
        seen[np.unique(sem)] = True
        counts.append(len(ids))
        # occlusion: two instances sharing a border
        horiz = (inst[:, 1:] != inst[:, :-1]) & (inst[:, 1:] > 0) & (inst[:, :-1] > 0)
        vert = (inst[1:] != inst[:-1]) & (inst[1:] > 0) & (inst[:-1] > 0)
        touching += bool(horiz.any() or vert.any())
    assert seen.all()
    assert set(counts) == {1, 2, 3}
    assert touching >= 10


def test_colour_does_not_give_the_class_away(synth):
    """A linear classifier on an object's mean colour stays near chance (1/6)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    feats, labels, bg = [], [], []
    for s in synth.samples:
        img, sem, inst = synth.load_image(s).astype(np.float64), synth.load_mask(s), load_instances(s)
        for i in np.unique(inst[inst > 0]):
            m = inst == i
            feats.append(img[m].mean(0) / 255.0)
            labels.append(int(sem[m][0]))
        bg.append(img[sem == 0].mean(0))
    feats, labels = np.array(feats), np.array(labels)
    acc = cross_val_score(LogisticRegression(max_iter=500), feats, labels, cv=5).mean()
    print(f"mean-colour classifier accuracy: {acc:.3f} (chance {1 / (len(CLASS_NAMES) - 1):.3f})")
    assert acc < 0.33, acc
    class_means = np.array([feats[labels == c].mean(0) for c in range(1, len(CLASS_NAMES))]) * 255
    assert np.abs(class_means - np.mean(bg, 0)).max() < 40, class_means


def test_rgbxy_kmeans_is_far_from_solving_it(synth):
    """K-means on colour + position, fitted on val, Hungarian by counts: <= 30 mIoU."""
    val = synth.split("val")
    images = [synth.load_image(s) for s in val]
    preds = rgbxy_kmeans_predict(images, k=synth.num_classes, seed=0)
    k = synth.num_classes
    conf = sum(confusion_matrix(p, synth.load_mask(s), k, k) for p, s in zip(preds, val))
    miou = hungarian_match(conf, by="counts").miou
    print(f"RGB+xy K-means on synthetic val: {miou:.1f} mIoU")
    assert miou <= 30.0


def test_rgbxy_kmeans_finds_two_separable_blobs():
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, :15] = (250, 10, 10)
    img[:, 15:] = (10, 10, 250)
    (pred,) = rgbxy_kmeans_predict([img], k=2, seed=0, xy_weight=0.1)
    assert pred.shape == (20, 30) and pred.dtype == np.int32
    assert len(np.unique(pred[:, :15])) == 1 and len(np.unique(pred[:, 15:])) == 1
    assert pred[0, 0] != pred[0, -1]


def test_bad_arguments(tmp_path):
    from pipeline.errors import ParamsError

    with pytest.raises(ParamsError, match="val_fraction=1.0"):
        generate_synthetic(tmp_path / "s", seed=0, num_images=4, val_fraction=1.0)
    assert not (tmp_path / "s").exists()
