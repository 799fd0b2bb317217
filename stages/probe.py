"""Stage `probe`: the supervised linear probe on frozen patch tokens (the ceiling, reported apart)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from pipeline import dist, runtime
from pipeline.artifacts import open_artifact, staged_folder, write_json
from pipeline.config import Params
from pipeline.errors import DataError
from pipeline.index import read_index
from pipeline.probe import ProbeConfig, evaluate_probe, train_linear_probe
from pipeline.progress import track


def run(params: Params, index_path: Path, features_path: Path, out: Path) -> dict:
    device = runtime.setup(params.base)
    index = read_index(index_path)
    ds = index.dataset
    if not ds.has_labels:
        raise DataError(f"dataset {ds.name!r} has no masks: the linear probe needs GT")
    pcfg = ProbeConfig.from_params(params.probe, params.base.seed, device)
    train = index.positions(params.base.train_split)
    val = index.positions(params.base.eval_split)
    with open_artifact(features_path, "useg.features", index.fingerprint) as f:
        grid = tuple(int(v) for v in f.attrs["grid"])
        tok = f["patch_tokens"]
        train_tokens = tok[train]
        val_tokens = tok[val]
    train_gt = [ds.load_mask(ds.samples[int(i)]) for i in track(train, "probe: train GT")]
    model = train_linear_probe(train_tokens, grid, train_gt, ds.num_classes, pcfg)
    del train_tokens, train_gt
    if not dist.is_main():  # rank 0 evaluates and writes the metrics
        return {}
    val_gt = [ds.load_mask(ds.samples[int(i)]) for i in track(val, "probe: eval GT")]
    res = evaluate_probe(model, val_tokens, val_gt)
    metrics = {"probe": {"miou": round(float(res.miou), 4), "pixel_accuracy": round(float(res.pixel_accuracy), 4), "matching": res.method}}
    with staged_folder(out) as tmp:
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "per_class.json", res.to_dict(ds.class_names))
    Console(stderr=True).print(
        f"probe: {ds.name} {params.base.eval_split}: mIoU {res.miou:.1f}, pixel accuracy {res.pixel_accuracy:.1f} "
        f"(train loss {model.history[0]:.3f} -> {model.history[-1]:.3f})"
    )
    return metrics
