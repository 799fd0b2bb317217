"""Stage `features`: run the backbone once over every image and store tokens in `features.h5`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from rich.console import Console

from pipeline import dist, runtime
from pipeline.artifacts import Provenance, string_dataset, write_artifact
from pipeline.config import Params
from pipeline.features import create_feature_datasets, iter_batches, probe_layout, to_f16
from pipeline.index import read_index
from pipeline.models.backbones import create_backbone
from pipeline.progress import track

SCHEMA = "useg.features"


def load_backbone(params: Params, device: torch.device) -> torch.nn.Module:
    cfg = params.features
    ckpt = cfg.checkpoint or None
    model = create_backbone(cfg.backbone, ckpt)
    if cfg.input_size[0] % model.patch_size or cfg.input_size[1] % model.patch_size:
        from pipeline.errors import ParamsError

        raise ParamsError(
            f"params key 'features.input_size': {cfg.input_size} is not a multiple of the patch size {model.patch_size}"
        )
    return model.eval().to(device)


def run(params: Params, index_path: Path, out: Path) -> float:
    """Returns the seconds spent in the loop over images (decode, forward, write)."""
    cfg = params.features
    device = runtime.setup(params.base)
    index = read_index(index_path)
    model = load_backbone(params, device)
    samples = index.dataset.samples
    layout = probe_layout(model.cpu(), cfg.input_size)
    model.to(device)
    prov = Provenance("features", params.section_json("features"), index.fingerprint, {"index": str(index_path)})
    t0 = time.perf_counter()

    def compute(block: list) -> Iterator[dict[str, np.ndarray]]:
        """float16 outputs per batch of `block`, in order."""
        batches = iter_batches(index.dataset, block, cfg.input_size, cfg.batch_size)
        n_batches = (len(block) + cfg.batch_size - 1) // cfg.batch_size
        with torch.inference_mode(), runtime.autocast(params.base, device):
            for _, x in track(batches, "features", total=n_batches):
                o = model(x.to(device))
                rec = {"patch_tokens": to_f16(o.patch_tokens)}
                if layout.has_cls:
                    rec["cls"] = to_f16(o.cls)
                if layout.heads:
                    rec["cls_attn"] = to_f16(o.cls_attn)
                    rec["cls_query"] = to_f16(o.cls_query)
                    if cfg.store_keys:
                        rec["keys"] = to_f16(o.keys)
                yield rec

    records = dist.sharded(samples, compute, out, align=cfg.batch_size)
    if records is None:  # another rank writes the artifact
        return time.perf_counter() - t0
    with write_artifact(out, SCHEMA, prov) as f:
        f.attrs["backbone"] = cfg.backbone
        f.attrs["grid"] = np.asarray(layout.grid, dtype=np.int64)
        f.attrs["input_size"] = np.asarray(cfg.input_size, dtype=np.int64)
        f.attrs["patch_size"] = int(model.patch_size)
        f.attrs["precision"] = runtime.resolve_precision(params.base, device)
        string_dataset(f, "ids", [s.id for s in samples])
        dsets = create_feature_datasets(f, len(samples), layout, cfg.store_keys)
        start = 0
        for rec in records:
            stop = start + len(rec["patch_tokens"])
            for name, value in rec.items():
                dsets[name][start:stop] = value
            start = stop
    dt = time.perf_counter() - t0
    Console(stderr=True).print(
        f"features: {len(samples)} images, {cfg.backbone} at {cfg.input_size[0]}x{cfg.input_size[1]} "
        f"(grid {layout.grid[0]}x{layout.grid[1]}), {runtime.resolve_precision(params.base, device)}: {dt:.1f} s, {dt / len(samples):.3f} s/image"
    )
    return dt
