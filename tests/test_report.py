"""`useg report`: a self-contained static page from a tiny fake run, and its rendering in headless Chromium.

The fake run is made with the writers the stages use: the synthetic dataset and `prepare`'s
index, a predictions artifact (a class permutation of the GT), the real `evaluate` stage
(metrics.json, per_class.json, confusion.png), DVCLive curves, masks.h5 and clusters.h5.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline import report as rep
from pipeline.artifacts import Provenance, RaggedWriter, string_dataset, write_artifact
from pipeline.config import Params
from pipeline.data.synthetic import generate_synthetic
from pipeline.errors import UsegError
from pipeline.index import read_index
from pipeline.metrics import resize_nearest
from pipeline.mining import mask_box
from pipeline.tracking import DVCLiveLogger
from stages import evaluate, prepare
from stages import report as stage
from stages.cli import app

PERMUTATION = np.array([3, 0, 6, 1, 2, 5, 4])  # predicted id of each GT class (7 synthetic classes)
PROBE_MIOU = 47.2345
CONTRAST_RETRIEVAL = 12.3456


class _Refs(HTMLParser):
    """Every src/href of a page, and the number of <img> and <script> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.imgs = 0
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.imgs += tag == "img"
        self.scripts += tag == "script"
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def parse(page: str) -> _Refs:
    p = _Refs()
    p.feed(page)
    return p


@dataclasses.dataclass(frozen=True)
class FakeRun:
    root: Path
    params: Params

    @property
    def index(self) -> Path:
        return self.root / "artifacts" / "index.h5"

    def report(self, out: Path, **kw) -> Path:
        args = dict(results_dir=self.root / "results", predictions_dir=self.root / "artifacts" / "predictions",
                    masks_path=self.root / "artifacts" / "masks.h5", clusters_path=self.root / "artifacts" / "clusters.h5",
                    cams_path=self.root / "artifacts" / "transfgu" / "cams.h5")
        args.update(kw)
        return stage.run(self.params, self.index, out_dir=out, num_samples=3, crops_per_cluster=4, **args)


def _write_predictions(path: Path, index_path: Path, split: str) -> None:
    index = read_index(index_path)
    pos = index.positions(split)
    with write_artifact(path, "useg.predictions", Provenance("baseline", "{}", index.fingerprint, {})) as f:
        string_dataset(f, "ids", [index.dataset.samples[int(i)].id for i in pos])
        f.create_dataset("positions", data=pos, track_times=False)
        f.attrs["methods"] = "patch_kmeans"
        g = f.create_group("patch_kmeans")
        g.attrs["num_clusters"] = len(PERMUTATION)
        w = RaggedWriter(g, "labels", np.uint16, 2)
        for i in pos:
            gt = index.dataset.load_mask(index.dataset.samples[int(i)])
            w.append(np.where(gt == 255, 0, PERMUTATION[np.minimum(gt, 6)]).astype(np.uint16))
        w.close()


def _write_masks_and_clusters(root: Path, index_path: Path, split: str) -> None:
    """One mask per visible object of every train image; its cluster = its GT class - 1."""
    index = read_index(index_path)
    ds = index.dataset
    image_pos, boxes, classes = [], [], []
    art = root / "artifacts"
    with write_artifact(art / "masks.h5", "useg.masks", Provenance("mine", "{}", index.fingerprint, {})) as f:
        w = RaggedWriter(f, "masks", np.uint8, 2)
        for p in index.positions(split):
            gt = ds.load_mask(ds.samples[int(p)])
            for c in np.unique(gt):
                if c in (0, 255):
                    continue
                m = gt == c
                w.append(m.astype(np.uint8))
                image_pos.append(int(p))
                boxes.append(mask_box(m))
                classes.append(int(c) - 1)
        w.close()
        f.create_dataset("image_index", data=np.asarray(image_pos, dtype=np.int64), track_times=False)
        f.create_dataset("box", data=np.asarray(boxes, dtype=np.int32).reshape(-1, 4), track_times=False)
        f.create_dataset("score", data=np.ones(len(boxes), dtype=np.float32), track_times=False)
        f.attrs["scene_centric"] = False
    labels = np.asarray(classes, dtype=np.int32)
    with write_artifact(art / "clusters.h5", "useg.clusters", Provenance("cluster", "{}", index.fingerprint, {})) as f:
        f.attrs["num_clusters"] = 6
        f.attrs["scene_centric"] = False
        f.create_dataset("label", data=labels, track_times=False)
        f.create_dataset("distance", data=np.linspace(0, 1, len(labels), dtype=np.float32), track_times=False)
        f.create_dataset("centroids", data=np.eye(6, dtype=np.float32), track_times=False)


CAM_GRID = 8  # token grid of the fake CAMs (64-px images: one token per 8x8 block)


def _write_cams(path: Path, index_path: Path, split: str) -> None:
    """Object-centric CAMs of 6 concepts whose map c is high exactly on the tokens of GT class c + 1."""
    index = read_index(index_path)
    pos = index.positions(split)
    with write_artifact(path, "useg.cams", Provenance("cams", "{}", index.fingerprint, {})) as f:
        f.attrs["scene_centric"] = False
        f.attrs["grid"] = np.asarray([CAM_GRID, CAM_GRID], dtype=np.int64)
        f.create_dataset("positions", data=pos, track_times=False)
        cams = np.full((len(pos), 6, CAM_GRID, CAM_GRID), 0.05, dtype=np.float16)
        for j, p in enumerate(pos):
            gt = index.dataset.load_mask(index.dataset.samples[int(p)])
            step = gt.shape[0] // CAM_GRID
            tokens = gt[step // 2::step, step // 2::step]
            for c in range(6):
                cams[j, c][tokens == c + 1] = 1.05
        f.create_dataset("cams", data=cams, track_times=False)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> FakeRun:
    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    generate_synthetic(data, seed=0, num_images=8, size=64, val_fraction=0.5)
    params = dataclasses.replace(Params(), base=dataclasses.replace(Params().base, data_root=str(data)))
    prepare.run(params, root / "artifacts" / "index.h5")
    index_path = root / "artifacts" / "index.h5"
    pred = root / "artifacts" / "predictions" / "baseline.h5"
    _write_predictions(pred, index_path, params.base.eval_split)
    evaluate.run(params, index_path, {"baseline": pred}, root / "results" / "evaluate")
    probe = {"probe": {"miou": PROBE_MIOU, "pixel_accuracy": 80.0, "matching": "identity"}}
    (root / "results" / "probe").mkdir(parents=True)
    (root / "results" / "probe" / "metrics.json").write_text(json.dumps(probe))
    (root / "results" / "contrast_eval").mkdir(parents=True)
    nested = {"maskcontrast": {"kmeans": {"miou": 20.0, "k": 7}, "retrieval": {"miou": CONTRAST_RETRIEVAL}}}
    (root / "results" / "contrast_eval" / "metrics.json").write_text(json.dumps(nested))
    ious = {"retrieval": {"miou": 50.0, "per_class_iou": {"background": 80.0, "striped_disc": None}, "mapping": [0, 1]}}
    (root / "results" / "contrast_eval" / "per_class.json").write_text(json.dumps(ious))
    live = DVCLiveLogger(root / "results" / "distill")
    for epoch, loss in enumerate([2.0, 1.2, 0.9]):
        live({"epoch": epoch, "loss": loss, "lr": 0.01 / (epoch + 1)})
    live.end()
    _write_masks_and_clusters(root, index_path, params.base.train_split)
    _write_cams(root / "artifacts" / "transfgu" / "cams.h5", index_path, params.base.train_split)
    return FakeRun(root, params)


@pytest.fixture(scope="module")
def full_report(fake_run: FakeRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_run.report(tmp_path_factory.mktemp("report") / "report")


# ----------------------------------------------------------------------------- the page


def test_page_is_self_contained_and_complete(fake_run: FakeRun, full_report: Path) -> None:
    folder = full_report.parent
    page = full_report.read_text()
    refs = parse(page)
    assert refs.scripts == 0 and "<link" not in page
    files = [r for r in refs.refs if not r.startswith("#")]
    assert files, "the page references no file"
    for ref in files:
        assert "://" not in ref and not ref.startswith("/"), ref
        assert (folder / ref).is_file(), f"{ref} referenced but not in {folder}"
    pngs = {p.name for p in folder.glob("*.png")}
    assert {"per_class_iou.png", "per_class_iou_contrast_eval.png", "confusion_baseline_patch_kmeans.png",
            "curves_distill.png", "samples.png", "cams.png"} <= pngs
    with h5py.File(fake_run.root / "artifacts" / "clusters.h5", "r") as f:
        sizes = np.bincount(f["label"][()], minlength=6)
    assert {f"cluster_{c:03d}.png" for c in range(6) if sizes[c]} == {p for p in pngs if p.startswith("cluster_")}
    for c in np.flatnonzero(sizes == 0):  # a cluster without masks is listed, with no picture
        assert f"cluster {c}: 0 masks" in page
    assert pngs == {Path(r).name for r in files}, "every PNG in the folder is on the page"
    assert 'class="note"' not in page, "nothing should be skipped in a complete run"
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o666 & ~umask}, "files keep the umask's mode"
    assert "synthetic" in page and "code version" in page


def test_page_shows_every_metrics_file_with_one_decimal(fake_run: FakeRun, full_report: Path) -> None:
    page = full_report.read_text()
    metrics = json.loads((fake_run.root / "results" / "evaluate" / "metrics.json").read_text())
    res = metrics["baseline"]["patch_kmeans"]
    assert res["miou"] == pytest.approx(100.0)  # a permutation of the GT: matched perfectly
    for value in (res["miou"], res["pixel_accuracy"]):
        assert f">{value:.1f}<" in page
    assert f">{PROBE_MIOU:.1f}<" in page and str(PROBE_MIOU) not in page
    assert "baseline / patch_kmeans" in page and "hungarian-counts" in page
    assert "results/contrast_eval/metrics.json" in page and "maskcontrast / retrieval" in page
    assert f">{CONTRAST_RETRIEVAL:.1f}<" in page


def test_samples_use_the_evaluate_mapping(full_report: Path) -> None:
    page = full_report.read_text()
    assert "baseline/patch_kmeans: mapped to GT classes by evaluate" in page
    grid = np.asarray(Image.open(full_report.parent / "samples.png").convert("RGB"))
    # image | GT | prediction, 3 rows; mapped prediction == GT, so the last two columns are equal
    tile = stage.SAMPLE_TILE  # square 64 px images scaled to the tile height
    assert grid.shape[:2] == (20 + 3 * (tile + 4) + 4, 4 + 3 * (tile + 4))
    gt = grid[20:20 + tile, 4 + (tile + 4):4 + (tile + 4) + tile]
    pred = grid[20:20 + tile, 4 + 2 * (tile + 4):4 + 2 * (tile + 4) + tile]
    np.testing.assert_array_equal(gt, pred)


def test_cam_section_shows_the_pseudo_labels_and_what_each_concept_wins(fake_run: FakeRun, full_report: Path) -> None:
    page = full_report.read_text()
    section = page[page.index('<section id="cams">'):]
    section = section[:section.index("</section>")]
    lines = re.findall(r"<li>([^<]*)</li>", section)
    assert len(lines) == 7 and lines[0].startswith("background: ")  # background + 6 concepts
    index = read_index(fake_run.index)
    names = index.dataset.class_names
    shares = {}
    for c in range(6):
        m = re.match(rf"concept {c}: ([0-9.]+)% of the train tokens; GT pixels under it: (.*)$", lines[c + 1])
        assert m, lines[c + 1]
        shares[c] = float(m.group(1))
        if shares[c] >= 1.0:  # concept c was made to fire on class c + 1: that class leads what it covers
            assert m.group(2).startswith(names[c + 1] + " "), (c, m.group(2))
    assert float(re.match(r"background: ([0-9.]+)%", lines[0]).group(1)) + sum(shares.values()) == pytest.approx(100, abs=0.5)
    assert sum(v >= 1.0 for v in shares.values()) >= 3, shares
    grid = np.asarray(Image.open(full_report.parent / "cams.png").convert("RGB"))
    tile = stage.SAMPLE_TILE  # image | GT | CAM pseudo-label, 3 rows (--samples 3)
    assert grid.shape[:2] == (20 + 3 * (tile + 4) + 4, 4 + 3 * (tile + 4))


def test_report_is_deterministic(fake_run: FakeRun, full_report: Path, tmp_path: Path) -> None:
    """Same inputs, same bytes: every PNG and the page itself (no timestamp), so DVC sees no change."""
    again = fake_run.report(tmp_path / "again").parent
    files = sorted(p.name for p in full_report.parent.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (again / name).read_bytes() == (full_report.parent / name).read_bytes(), name


def test_missing_optional_inputs_are_skipped_with_a_note(fake_run: FakeRun, tmp_path: Path) -> None:
    empty = tmp_path / "nothing"
    page_path = fake_run.report(tmp_path / "report", results_dir=empty / "results", predictions_dir=empty / "pred",
                                masks_path=empty / "masks.h5", clusters_path=empty / "clusters.h5",
                                cams_path=empty / "cams.h5")
    page = page_path.read_text()
    assert parse(page).imgs == 0
    notes = re.findall(r'<p class="note">([^<]*)</p>', page)
    for missing in ("metrics.json", "per_class.json", "confusion.png", "DVCLive", "predictions", "masks.h5", "cams.h5"):
        assert any(missing in n for n in notes), f"no note about {missing}: {notes}"
    assert sorted(p.name for p in page_path.parent.iterdir()) == ["index.html"]


def test_baseline_only_run_skips_the_gallery(fake_run: FakeRun, tmp_path: Path) -> None:
    page = fake_run.report(tmp_path / "report", masks_path=tmp_path / "none.h5").read_text()
    assert "none.h5 not found" in page and "cluster_000.png" not in page
    assert "samples.png" in page


def test_stale_artifacts_are_skipped_with_a_note(fake_run: FakeRun, tmp_path: Path) -> None:
    preds = tmp_path / "predictions"
    with write_artifact(preds / "old.h5", "useg.predictions", Provenance("baseline", "{}", "another-dataset", {})) as f:
        f.attrs["methods"] = ""
    shutil.copy(fake_run.root / "artifacts" / "predictions" / "baseline.h5", preds / "baseline.h5")
    page = fake_run.report(tmp_path / "report", predictions_dir=preds).read_text()
    assert "skipped old.h5" in page and "made from another dataset" in page
    assert "samples.png" in page


def test_cams_of_another_dataset_or_of_no_image_are_skipped_with_a_note(fake_run: FakeRun, tmp_path: Path) -> None:
    with write_artifact(tmp_path / "cams.h5", "useg.cams", Provenance("cams", "{}", "another-dataset", {})) as f:
        f.attrs["scene_centric"] = False
    page = fake_run.report(tmp_path / "report", cams_path=tmp_path / "cams.h5").read_text()
    assert "made from another dataset" in page and "cams.png" not in page
    assert "samples.png" in page
    index = read_index(fake_run.index)
    with write_artifact(tmp_path / "empty.h5", "useg.cams", Provenance("cams", "{}", index.fingerprint, {})) as f:
        f.attrs["scene_centric"] = True
        f.create_dataset("positions", data=np.zeros(0, dtype=np.int64))
        f.create_dataset("cams", data=np.zeros((0, 3, CAM_GRID, CAM_GRID), dtype=np.float16))
    page = fake_run.report(tmp_path / "report2", cams_path=tmp_path / "empty.h5").read_text()
    assert "empty.h5 holds no image" in page and "cams.png" not in page


def test_report_replaces_an_earlier_report_whole(fake_run: FakeRun, tmp_path: Path) -> None:
    out = tmp_path / "report"
    fake_run.report(out)
    (out / "stale.png").write_bytes(b"x")
    fake_run.report(out, masks_path=tmp_path / "none.h5")
    assert not (out / "stale.png").exists() and not list(out.glob("cluster_*.png"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_refuses_to_replace_a_folder_that_is_not_a_report(fake_run: FakeRun, tmp_path: Path) -> None:
    (tmp_path / "results" / "keep.txt").parent.mkdir()
    (tmp_path / "results" / "keep.txt").write_text("precious")
    with pytest.raises(UsegError, match="holds no earlier useg report"):
        fake_run.report(tmp_path / "results")
    assert (tmp_path / "results" / "keep.txt").read_text() == "precious"


def test_cli_missing_index_exits_2_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "artifacts" / "index.h5"
    res = CliRunner().invoke(app, ["report", "--index", str(missing), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert str(missing) in res.output and "image index not found" in res.output
    assert not (tmp_path / "r").exists()


def test_cli_writes_the_page(fake_run: FakeRun, tmp_path: Path) -> None:
    root = fake_run.root
    params = tmp_path / "params.yaml"
    params.write_text(f"base:\n  data_root: {root / 'data'}\n")
    res = CliRunner().invoke(app, [
        "report", "--index", str(fake_run.index), "--results", str(root / "results"),
        "--predictions", str(root / "artifacts" / "predictions"), "--masks", str(root / "artifacts" / "masks.h5"),
        "--clusters", str(root / "artifacts" / "clusters.h5"), "--cams", str(root / "artifacts" / "transfgu" / "cams.h5"),
        "--out", str(tmp_path / "r"), "--samples", "2",
        "--crops", "2", "--params", str(params),
    ])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "index.html").is_file() and (tmp_path / "r" / "samples.png").is_file()
    assert (tmp_path / "r" / "cams.png").is_file()


# ----------------------------------------------------------------------------- building blocks


def test_resize_nearest_takes_the_cell_under_each_pixel_centre() -> None:
    labels = np.array([[1, 2], [3, 4]])
    np.testing.assert_array_equal(resize_nearest(labels, (4, 6)), np.kron(labels, np.ones((2, 3), dtype=np.int64)))
    grid = np.arange(9).reshape(3, 3)
    np.testing.assert_array_equal(resize_nearest(grid, (2, 2)), [[0, 2], [6, 8]])  # centres at 0.75 and 2.25
    np.testing.assert_array_equal(resize_nearest(grid, (3, 3)), grid)


def test_format_value() -> None:
    assert [rep.format_value(v) for v in (12.345, 7, 0.0, None, True, "x", 0.01234, float("nan"))] == [
        "12.3", "7", "0.0", "-", "true", "x", "0.0123", "nan"]


def test_metrics_rows_flatten_nested_keys() -> None:
    columns, rows = rep.metrics_rows(
        {"images": 3, "diag": {"before": {"pixel_accuracy": 1.0, "miou": 2.0}, "after": {"miou": 3.0, "k": 4}}}, "filter")
    assert columns == ["miou", "pixel_accuracy", "images", "k"]
    assert rows == [("filter", {"images": 3}), ("diag / before", {"pixel_accuracy": 1.0, "miou": 2.0}),
                    ("diag / after", {"miou": 3.0, "k": 4})]


def test_per_class_series_reads_any_nesting() -> None:
    evaluate = {"baseline": {"patch_kmeans": {"miou": 1.0, "per_class_iou": {"a": 1.0}}}, "x": {"y": 2}}
    assert rep.per_class_series(evaluate) == {"baseline/patch_kmeans": {"a": 1.0}}
    assert rep.per_class_series({"per_class_iou": {"a": None}}) == {"": {"a": None}}
    assert rep.per_class_series(None) == {} and rep.per_class_series([1, 2]) == {}


def test_map_labels_and_masked_crop() -> None:
    labels = np.array([[0, 1], [2, 3]])
    np.testing.assert_array_equal(rep.map_labels(labels, [2, -1, 0]), [[2, 255], [0, 255]])
    img = np.full((4, 5, 3), 100, dtype=np.uint8)
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 1:4] = True
    mask[1, 1] = False
    crop = rep.masked_crop(img, mask, mask_box(mask))
    assert crop.shape == (2, 3, 3)
    assert crop[0, 0, 0] == 30 and crop[1, 1, 0] == 100
    gt = np.array([[0, 1, 1], [2, 255, 1]])
    counts = rep.gt_pixel_counts(gt, np.ones((2, 3), dtype=bool), 3)
    np.testing.assert_array_equal(counts, [1, 3, 1])
    assert rep.class_shares(counts, ["bg", "a", "b"], top=2) == "a 60%, bg 20%"
    assert rep.class_shares(np.zeros(3), ["bg", "a", "b"]) == "none labelled"


# ----------------------------------------------------------------------------- rendering in a browser


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("chromium not found: run scripts/setup.sh (it installs the Debian package `chromium` as root)")


def _headless(*args: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


_IMAGE_STATUS = (
    "<script>window.addEventListener('load', function () {"
    "document.body.setAttribute('data-img-status', Array.prototype.map.call(document.images,"
    " function (i) { return i.complete && i.naturalWidth > 0 ? '1' : '0'; }).join('') || 'none');});</script>"
)


def images_loaded(page: Path, profile: Path) -> str:
    """'1'/'0' per <img> of a page as Chromium loaded it (a copy of the page with a load-time probe)."""
    probe = page.with_name(f"_probe_{page.name}")
    probe.write_text(page.read_text().replace("</body>", _IMAGE_STATUS + "</body>"))
    try:
        done = _headless("--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri(), profile=profile)
    finally:
        probe.unlink()
    found = re.search(r'data-img-status="([01]+|none)"', done.stdout)
    assert found, f"chromium printed no image status (rc {done.returncode}): {done.stderr[-2000:]}"
    return found.group(1)


def test_page_renders_in_headless_chromium(full_report: Path, tmp_path: Path) -> None:
    folder = tmp_path / "report"
    shutil.copytree(full_report.parent, folder)  # the copy must work on its own: self-contained
    page = folder / "index.html"
    shot = tmp_path / "screenshot.png"
    done = _headless(f"--screenshot={shot}", "--window-size=1200,3000", page.resolve().as_uri(), profile=tmp_path / "profile")
    assert shot.is_file(), f"no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"
    assert shot.stat().st_size > 10_000
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (3000, 1200)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50, "the screenshot is (nearly) one colour"
    status = images_loaded(page, tmp_path / "profile")
    assert status == "1" * parse(page.read_text()).imgs, f"images not loaded: {status}"


def test_image_check_catches_a_broken_image(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "ok.png")
    page = tmp_path / "page.html"
    page.write_text('<!DOCTYPE html><html><body><img src="ok.png"><img src="missing.png"></body></html>')
    assert images_loaded(page, tmp_path / "profile") == "10"
