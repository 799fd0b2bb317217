"""Several processes per stage (base.nproc = 2, gloo on this CPU).

A tiny MaskDistill chain runs once with one process; then the sharded inference stages
(features, mine, filter, predict) run on 2 ranks and must write byte-identical artifacts,
and the segmenter trains under DDP on 2 ranks with a loss curve that follows the
one-process curve.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import yaml

from cli_run import useg
from pipeline.artifacts import file_md5
from pipeline.dist import block

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

#: Largest relative gap allowed between the 2-rank and the 1-rank epoch losses. The ranks
#: see the same global batch and average their gradients, but batch norm statistics come
#: from each rank's half batch (SyncBatchNorm is GPU-only in torch) and OHEM picks the
#: hardest 20% of pixels per half, so the curves agree closely, not exactly (measured here:
#: 0.2%, 5% and 11% apart over 3 epochs in one run, 0.2%, 2% and 19% in another: the gap
#: grows as the two runs drift apart, so the last epoch, where the loss is small, is checked
#: against the scale of the run instead: both end below LOSS_END of their first-epoch loss
#: (measured 5.8-7.5%). Those runs differed because the fixture's random-init MobileNetV2 took
#: the worker's global RNG state, which depends on the tests that ran before it (a CI-like run
#: once failed at 15.1% in the middle epoch); it is now seeded (conftest's `random_mobilenet_v2`):
#: 0.2%, 3.2% and 12% apart, ending at 7.3% and 6.5%.
LOSS_RTOL = 0.15
LOSS_END = 0.15


def write_params(dst: Path, nproc: int) -> None:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["base"].update(threads=1, nproc=nproc)
    p["synth"].update(num_images=18, image_size=56)
    p["features"].update(input_size=[56, 56], batch_size=4, checkpoint="")
    p["cluster"].update(embedding="pooled", kmeans_redo=1)
    p["distill"].update(epochs=1, min_size=56, max_size=112, warmup_iters=1, batch_size=4)
    p["segment"].update(epochs=3, crop_size=56, batch_size=4)
    p["probe"].update(epochs=2, batch_size=4)
    p["contrast_mine"].update(method="attention")
    p["contrast"].update(epochs=1, crop_size=48, batch_size=4, queue_size=8)
    p["transfgu"].update(concept_images=6, crop_size=56, train_size=56, epochs=2, batch_size=4, bootstrap_start=1)
    dst.write_text(yaml.safe_dump(p, sort_keys=False))


def loss_curve(run: Path) -> list[float]:
    with open(run / "results" / "segment" / "plots" / "metrics" / "loss.tsv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh, delimiter="\t")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, random_mobilenet_v2) -> Path:
    """The tiny chain with one process (random-init backbones: the test is about processes)."""
    d = tmp_path_factory.mktemp("dist")
    write_params(d / "params.yaml", 1)
    write_params(d / "params2.yaml", 2)
    (d / "w").mkdir()
    shutil.copy(random_mobilenet_v2, d / "w" / "mobilenet_v2_imagenet.pt")
    a = "artifacts"
    useg(d, "synth", "--out", "data/synthetic")
    useg(d, "prepare", "--out", f"{a}/index.h5")
    useg(d, "features", "--index", f"{a}/index.h5", "--out", f"{a}/features.h5")
    useg(d, "mine", "--index", f"{a}/index.h5", "--features", f"{a}/features.h5", "--weights", "w", "--out", f"{a}/masks.h5")
    useg(d, "cluster", "--index", f"{a}/index.h5", "--features", f"{a}/features.h5", "--masks", f"{a}/masks.h5",
         "--out", f"{a}/clusters.h5")
    useg(d, "distill", "--index", f"{a}/index.h5", "--masks", f"{a}/masks.h5", "--clusters", f"{a}/clusters.h5",
         "--weights", "w", "--out", "models/initial.pt")
    useg(d, "filter", "--index", f"{a}/index.h5", "--masks", f"{a}/masks.h5", "--clusters", f"{a}/clusters.h5",
         "--model", "models/initial.pt", "--out", f"{a}/pseudolabels.h5", "--metrics", "results/filter")
    useg(d, "train-segmenter", "--index", f"{a}/index.h5", "--pseudolabels", f"{a}/pseudolabels.h5", "--weights", "w",
         "--out", "models/segmenter.pt")
    useg(d, "predict", "--index", f"{a}/index.h5", "--model", "models/segmenter.pt", "--out", f"{a}/predictions.h5")
    useg(d, "mine", "--section", "contrast_mine", "--index", f"{a}/index.h5", "--features", f"{a}/features.h5",
         "--weights", "w", "--out", f"{a}/contrast_masks.h5")
    useg(d, "concepts", "--index", f"{a}/index.h5", "--out", f"{a}/concepts.h5")
    useg(d, "cams", "--index", f"{a}/index.h5", "--concepts", f"{a}/concepts.h5", "--out", f"{a}/cams.h5")
    return d


def test_blocks_cover_the_items_in_order_aligned_to_the_batch(monkeypatch) -> None:
    got = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        r = block(22, 4)
        assert r.start % 4 == 0
        got += list(r)
    assert got == list(range(22))


@pytest.mark.parametrize(
    "stage, args, artifact",
    [
        ("features", ["--index", "artifacts/index.h5"], "features.h5"),
        ("mine", ["--index", "artifacts/index.h5", "--features", "artifacts/features.h5", "--weights", "w"], "masks.h5"),
        ("filter", ["--index", "artifacts/index.h5", "--masks", "artifacts/masks.h5", "--clusters", "artifacts/clusters.h5",
                    "--model", "models/initial.pt", "--metrics", "results/filter2"], "pseudolabels.h5"),
        ("predict", ["--index", "artifacts/index.h5", "--model", "models/segmenter.pt"], "predictions.h5"),
    ],
)
def test_sharded_stage_is_byte_identical(run: Path, stage: str, args: list[str], artifact: str) -> None:
    r = useg(run, stage, *args, "--out", f"two/{artifact}", params="params2.yaml")
    assert "2 ranks under torchrun" in r.stderr
    assert file_md5(run / "two" / artifact) == file_md5(run / "artifacts" / artifact)
    assert not list((run / "two").glob(".*shard*")), "shard files left behind"


def test_segmenter_ddp_loss_follows_one_process(run: Path) -> None:
    one = loss_curve(run)
    r = useg(run, "train-segmenter", "--index", "artifacts/index.h5", "--pseudolabels", "artifacts/pseudolabels.h5",
             "--weights", "w", "--out", "two/segmenter.pt", params="params2.yaml")
    assert "2 ranks under torchrun" in r.stderr
    two = loss_curve(run)
    assert len(two) == len(one) == 3
    for a, b in zip(one[:2], two[:2]):
        assert abs(a - b) <= LOSS_RTOL * a, f"1 process {one} vs 2 ranks {two}"
    assert one[2] <= LOSS_END * one[0] and two[2] <= LOSS_END * two[0], f"1 process {one} vs 2 ranks {two}"
    assert (run / "two" / "segmenter.pt").exists()


@pytest.mark.parametrize(
    "stage, args, out",
    [
        ("probe", ["--index", "artifacts/index.h5", "--features", "artifacts/features.h5"], "two/probe"),
        ("distill", ["--index", "artifacts/index.h5", "--masks", "artifacts/masks.h5", "--clusters", "artifacts/clusters.h5",
                     "--weights", "w"], "two/initial.pt"),
        ("contrast", ["--index", "artifacts/index.h5", "--masks", "artifacts/contrast_masks.h5", "--weights", "w"],
         "two/contrast.pt"),
        ("transfgu", ["--index", "artifacts/index.h5", "--cams", "artifacts/cams.h5"], "two/transfgu.pt"),
    ],
)
def test_training_stage_runs_on_two_ranks(run: Path, stage: str, args: list[str], out: str) -> None:
    """Every training stage trains as 2 DDP ranks and rank 0 writes its output."""
    r = useg(run, stage, *args, "--out", out, params="params2.yaml")
    assert "2 ranks under torchrun" in r.stderr
    assert (run / out).exists()
