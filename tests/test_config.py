"""params.yaml validation: unknown keys, wrong types and out-of-range values name the key."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.config import load_params
from pipeline.errors import ParamsError
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_repo_params_load_and_are_frozen():
    p = load_params(ROOT / "params.yaml")
    assert p.base.dataset == "synthetic"
    with pytest.raises(Exception):
        p.base.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["features"].update(bogus=1), "params key 'features.bogus' is unknown"),
        (lambda r: r.update(nosuchsection={}), "params key 'nosuchsection' is unknown"),
        (lambda r: r["base"].update(seed="zero"), "params key 'base.seed': expected an integer"),
        (lambda r: r["probe"].update(lr="fast"), "params key 'probe.lr': expected a number"),
        (lambda r: r["features"].update(store_keys="yes"), "params key 'features.store_keys': expected true or false"),
        (lambda r: r["base"].update(dataset="imagenet"), "params key 'base.dataset': 'imagenet' is not one of"),
        (lambda r: r["synth"].update(val_fraction=1.5), "params key 'synth.val_fraction': 1.5 is out of range"),
        (lambda r: r["features"].update(input_size=[224]), "params key 'features.input_size'"),
        (lambda r: r["baseline"].update(methods=["spectral"]), "params key 'baseline.methods'"),
        (lambda r: r["segment"].update(model="resnet"), "params key 'segment.model': 'resnet' is not one of"),
    ],
)
def test_bad_params_name_the_key(tmp_path, edit, message):
    path = write(tmp_path, edit)
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_bad_param_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, lambda r: r["baseline"].update(num_clusters=-3))
    res = CliRunner().invoke(app, ["prepare", "--params", str(path), "--out", str(tmp_path / "index.h5")])
    assert res.exit_code == 2
    assert "params key 'baseline.num_clusters': -3 is out of range" in res.output
    assert not (tmp_path / "index.h5").exists()


def test_cli_prepare_names_a_corrupt_image_and_writes_nothing(tmp_path):
    import numpy as np
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(photos / "a.png")
    (photos / "b.png").write_bytes(b"not a png at all")
    path = write(tmp_path, lambda r: r["base"].update(dataset="folder", data_root=str(photos), train_split="train", eval_split="train"))
    out = tmp_path / "index.h5"
    res = CliRunner().invoke(app, ["prepare", "--params", str(path), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "b.png" in res.output and "cannot decode image" in res.output
    assert not out.exists() and list(tmp_path.glob("*.tmp.h5")) == []
