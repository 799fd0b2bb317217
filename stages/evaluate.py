"""Stage `evaluate`: one confusion matrix per predictor over the whole eval split at original resolution.

Hungarian matching (by pixel counts or IoU) when K equals the number of classes; many-to-one
majority vote when K is larger (over-clustering), reported under its own key. Writes
`metrics.json` (for `dvc metrics`), per-class IoU, a sampled confusion CSV (for `dvc plots`),
the exact confusion matrix as PNG and an overlay grid (image | GT | prediction).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.artifacts import RaggedReader, open_artifact, read_strings, staged_folder, write_json
from pipeline.config import Params
from pipeline.errors import DataError, UsegError
from pipeline.index import ImageIndex, read_index
from pipeline.metrics import MatchResult, confusion_matrix, hungarian_match, majority_match
from pipeline.progress import track
from pipeline import viz

CONFUSION_SAMPLES = 20_000


def match(conf: np.ndarray, by: str) -> MatchResult:
    k, c = conf.shape
    if k == c:
        return hungarian_match(conf, by=by)
    if k > c:
        return majority_match(conf)
    raise UsegError(f"{k} clusters for {c} classes: fewer clusters than classes cannot be evaluated by matching")


def confusion_stride(index: ImageIndex, positions: np.ndarray) -> int:
    """Pixel stride of the sample written for DVC's confusion plot (about CONFUSION_SAMPLES pixels)."""
    total = int(sum(int(index.heights[i]) * int(index.widths[i]) for i in positions))
    return max(1, total // CONFUSION_SAMPLES)


def evaluate_predictor(
    index: ImageIndex, reader: RaggedReader, positions: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the split: the (K, C) confusion matrix and a strided (GT, cluster) pixel sample."""
    c = index.dataset.num_classes
    conf = np.zeros((k, c), dtype=np.int64)
    stride = confusion_stride(index, positions)
    gt_sample, pred_sample = [], []
    for j, i in enumerate(track(positions, "evaluate")):
        s = index.dataset.samples[int(i)]
        gt = index.dataset.load_mask(s)
        pred = reader[j]
        if pred.shape != gt.shape:
            raise DataError(f"{s.mask}: prediction size {pred.shape} differs from mask size {gt.shape}")
        conf += confusion_matrix(pred.astype(np.int64), gt, k, c)
        g, p = gt.reshape(-1)[::stride], pred.reshape(-1)[::stride].astype(np.int64)
        keep = g != 255
        gt_sample.append(g[keep])
        pred_sample.append(p[keep])
    return conf, np.concatenate(gt_sample), np.concatenate(pred_sample)


def sampled_confusion_rows(gt: np.ndarray, pred: np.ndarray, result: MatchResult, names: list[str]) -> list[tuple[str, str]]:
    """(actual, predicted class name) rows for DVC's confusion template, after matching."""
    mapped = result.mapping[pred]
    return [(names[a], names[b] if b >= 0 else "unmatched") for a, b in zip(gt, mapped)]


def overlays(index, reader, positions, result: MatchResult, n: int, out_path: Path) -> None:
    rows = []
    for j, i in enumerate(positions[:n]):
        s = index.dataset.samples[int(i)]
        img = index.dataset.load_image(s)
        gt = index.dataset.load_mask(s)
        mapped = result.mapping[reader[j].astype(np.int64)]
        mapped = np.where(mapped < 0, 255, mapped).astype(np.uint8)
        rows.append([img, viz.overlay(img, gt, alpha=0.7), viz.overlay(img, mapped, alpha=0.7)])
    if rows:
        viz.overlay_grid(rows, ["image", "ground truth", "prediction"], out_path)


def run(params: Params, index_path: Path, predictions: dict[str, Path], out: Path) -> dict:
    """Writes OUT as a whole (a temporary folder renamed into place): an interrupted run leaves the old one."""
    index = read_index(index_path)
    if not index.dataset.has_labels:
        raise DataError(f"dataset {index.dataset.name!r} at {index.dataset.samples[0].image.parent} has no masks: nothing to evaluate")
    table = Table(title=f"{index.dataset.name} {params.base.eval_split}")
    for col in ("predictor", "method", "K", "matching", "mIoU", "pixel acc"):
        table.add_column(col)
    with staged_folder(out) as tmp:
        metrics = write_evaluation(params, index, predictions, tmp, table)
    Console(stderr=True).print(table)
    return metrics


def write_evaluation(params: Params, index: ImageIndex, predictions: dict[str, Path], out: Path, table: Table) -> dict:
    """Evaluate every predictor into the folder OUT; add a row per method to `table`."""
    names = index.dataset.class_names
    metrics: dict = {}
    per_class: dict = {}
    for pred_name, path in predictions.items():
        with open_artifact(path, "useg.predictions", index.fingerprint) as f:
            positions = f["positions"][()]
            ids = read_strings(f, "ids")
            expect = [index.dataset.samples[int(i)].id for i in index.positions(params.base.eval_split)]
            if ids != expect:
                raise DataError(f"{path}: predictions are not for the '{params.base.eval_split}' split of this index: re-run its stage")
            for method in str(f.attrs["methods"]).split(","):
                g = f[method]
                k = int(g.attrs["num_clusters"])
                reader = RaggedReader(g, "labels")
                conf, gt_sample, pred_sample = evaluate_predictor(index, reader, positions, k)
                res = match(conf, params.evaluate.matching)
                # over-clustering is never mixed with the Hungarian numbers: its own key
                key = method if res.method.startswith("hungarian") else f"{method}_overclustered_k{k}"
                metrics.setdefault(pred_name, {})[key] = {
                    "miou": round(float(res.miou), 4),
                    "pixel_accuracy": round(float(res.pixel_accuracy), 4),
                    "k": k,
                    "matching": res.method,
                }
                per_class.setdefault(pred_name, {})[key] = res.to_dict(names)
                sub = out / f"{pred_name}_{key}"
                sub.mkdir(parents=True, exist_ok=True)
                with open(sub / "confusion.csv", "w", newline="") as fh:
                    wr = csv.writer(fh)
                    wr.writerow(["actual", "predicted"])
                    wr.writerows(sampled_confusion_rows(gt_sample, pred_sample, res, names))
                np.savetxt(sub / "confusion_counts.csv", conf, fmt="%d", delimiter=",")
                viz.confusion_png(res.class_confusion, names, sub / "confusion.png")
                overlays(index, reader, positions, res, params.evaluate.num_overlays, sub / "overlays.png")
                table.add_row(pred_name, key, str(k), res.method, f"{res.miou:.1f}", f"{res.pixel_accuracy:.1f}")
    write_json(out / "metrics.json", metrics)
    write_json(out / "per_class.json", per_class)
    return metrics
