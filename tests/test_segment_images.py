"""`useg segment`: label maps and overlays for image files, corrupt files reported, names never clash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.config import load_params
from pipeline.errors import UsegError
from pipeline.segmenter import build_deeplab
from stages.cli import app
from stages.segment import save_segmenter
from stages.segment_images import collect_images, network_size, output_names

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
NUM_CLASSES = 4
SIZES = {"a.png": (40, 56), "b.jpg": (64, 48), "c.webp": (40, 56)}  # (height, width)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_deeplab(num_classes=NUM_CLASSES, backbone_weights=None).eval()
    path = tmp_path_factory.mktemp("model") / "segmenter.pt"
    save_segmenter(model, NUM_CLASSES, load_params(PARAMS), "test", path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    """3 images of two sizes, a truncated PNG and a text file named .jpg."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "truncated.png")
    data = (folder / "truncated.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("not an image\n")
    (folder / "readme.txt").write_text("ignored: not an image extension\n")
    return folder


def segment(*args: str | Path):
    return CliRunner().invoke(app, ["segment", *map(str, args), "--params", str(PARAMS)], env={"USEG_QUIET": "1"})


def test_segment_writes_label_maps_and_overlays_and_reports_corrupt_files(photos, model_path, tmp_path):
    out = tmp_path / "out"
    res = segment(photos, "--model", model_path, "--out", out, "--batch-size", "2")
    assert res.exit_code == 1, res.output
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([f"{Path(n).stem}.png" for n in SIZES] + [f"{Path(n).stem}_overlay.png" for n in SIZES])
    for name, (h, w) in SIZES.items():
        stem = Path(name).stem
        with Image.open(out / f"{stem}.png") as im:
            assert im.mode == "L" and im.size == (w, h)
            assert np.asarray(im).max() < NUM_CLASSES
        with Image.open(out / f"{stem}_overlay.png") as im:
            assert im.mode == "RGB" and im.size == (w, h)
    lines = res.stderr.splitlines()
    assert any(line.startswith(f"{photos / 'truncated.png'}: ") for line in lines), res.stderr
    assert any(line.startswith(f"{photos / 'notes.jpg'}: cannot decode image") for line in lines), res.stderr
    assert "segment: 3 images" in res.stderr and "images/s" in res.stderr


def test_segment_is_byte_identical_across_runs(photos, model_path, tmp_path):
    outs = [tmp_path / "run1", tmp_path / "run2"]
    for out in outs:
        assert segment(photos, "--model", model_path, "--out", out).exit_code == 1
    first = {p.name: p.read_bytes() for p in outs[0].iterdir()}
    assert len(first) == 6
    assert first == {p.name: p.read_bytes() for p in outs[1].iterdir()}


def test_segment_resized_inputs_and_crf_keep_original_sizes(photos, model_path, tmp_path):
    for args in (["--size", "32", "32"], ["--max-side", "20"], ["--crf"]):
        out = tmp_path / args[0].strip("-")
        res = segment(photos / "a.png", photos / "b.jpg", "--model", model_path, "--out", out, *args)
        assert res.exit_code == 0, res.output
        for name in ("a.png", "b.jpg"):
            h, w = SIZES[name]
            labels = np.asarray(Image.open(out / f"{Path(name).stem}.png"))
            assert labels.shape == (h, w) and labels.max() < NUM_CLASSES


def test_segment_missing_model_exits_2_and_writes_nothing(photos, tmp_path):
    out = tmp_path / "out"
    res = segment(photos, "--model", tmp_path / "nope.pt", "--out", out)
    assert res.exit_code == 2
    assert "nope.pt" in res.output and "checkpoint not found" in res.output
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda p: [p.parent / "missing"], "no such file or folder"),
        (lambda p: [p.parent / "empty"], "no images found"),
        (lambda p: [p, "--size", "8", "8", "--max-side", "8"], "--size and --max-side"),
        (lambda p: [p, "--method", "stego"], "--method 'stego': unknown"),
        (lambda p: [p / "a.png", "--out", p], "would overwrite the input"),
    ],
)
def test_segment_bad_input_exits_2_before_any_work(photos, model_path, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    argv = [*args(photos), "--model", model_path]
    if "--out" not in argv:
        argv += ["--out", tmp_path / "out"]
    before = sorted(photos.iterdir())
    res = segment(*argv)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (tmp_path / "out").exists() and sorted(photos.iterdir()) == before


def test_collect_images_sorted_filtered_and_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for rel in ("b.PNG", "a.jpeg", "c.tiff", "notes.txt", ".d.png", "sub/e.bmp", ".hidden/f.png", "out/g.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert [p.name for p in collect_images([tmp_path])] == ["a.jpeg", "b.PNG", "c.tiff"]
    found = collect_images([tmp_path, tmp_path / "a.jpeg"], recursive=True, exclude=tmp_path / "out")
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.jpeg", "b.PNG", "c.tiff", "sub/e.bmp"]
    with pytest.raises(UsegError, match="no images found"):
        collect_images([tmp_path / "out"], exclude=tmp_path / "out")


def test_output_names_disambiguate_only_clashes():
    paths = [Path("/d/train/cats/a.png"), Path("/d/val/cats/a.png"), Path("/d/val/dogs/A.png"),
             Path("/d/y/e.png"), Path("/d/y/e.jpg"), Path("/d/x/b.png"), Path("/d/x/b_overlay.png"), Path("/d/x/c.png")]
    names = output_names(paths)
    assert names == ["train_cats_a", "val_cats_a", "dogs_A", "e_png", "e_jpg", "b", "x_b_overlay", "c"]
    keys = [n.casefold() for n in names] + [f"{n}_overlay".casefold() for n in names]
    assert len(set(keys)) == len(keys)
    with pytest.raises(UsegError, match="no output names tell them apart"):
        output_names([Path("/d/x/A.png"), Path("/d/x/a.png")])


def test_network_size():
    assert network_size((40, 56), None, None) == (40, 56)
    assert network_size((40, 56), (32, 32), None) == (32, 32)
    assert network_size((40, 56), None, 28) == (20, 28)
    assert network_size((40, 56), None, 100) == (40, 56)


def test_segment_corrupt_model_exits_2(photos, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    res = segment(photos, "--model", bad, "--out", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert "not a segmenter checkpoint" in res.output and not (tmp_path / "out").exists()


def test_transfgu_decoder_segments_images(tmp_path):
    """`--method transfgu`: the decoder on its ViT labels images of any size."""
    from pipeline.transfgu import MaskTransformerDecoder
    from stages.transfgu import load_transfgu_segmenter

    torch.manual_seed(0)
    decoder = MaskTransformerDecoder(384, 3, 384, 1, 6, 0.0)
    ckpt = tmp_path / "transfgu.pt"
    torch.save({"state_dict": decoder.state_dict(), "in_dim": 384, "num_classes": 3, "dataset_fingerprint": "x",
                "config": {"d_model": 384, "decoder_depth": 1, "decoder_heads": 6, "dropout": 0.0},
                "backbone": "dinov2_vits14", "backbone_checkpoint": ""}, ckpt)
    model, state = load_transfgu_segmenter(ckpt)
    logits = model(torch.zeros(1, 3, 40, 50))
    assert logits.shape == (1, 3, 40, 50) and state["num_classes"] == 3
