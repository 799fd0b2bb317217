"""Stage `distill`: train the initial Mask R-CNN on the clustered masks (pseudo-classes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from rich.console import Console

from pipeline import dist, runtime
from pipeline.artifacts import RaggedReader, open_artifact, save_checkpoint
from pipeline.config import Params
from pipeline.index import read_index
from pipeline.maskrcnn import train_maskrcnn
from pipeline.tracking import training_curves


def load_targets(index, masks, clusters) -> tuple[np.ndarray, list[list[tuple[np.ndarray, int]]]]:
    """Train positions with at least one mask, and per position its (mask, class id >= 1)."""
    pos = masks["image_index"][()]
    labels = clusters["label"][()]
    reader = RaggedReader(masks, "masks")
    by_image: dict[int, list[tuple[np.ndarray, int]]] = {}
    for j, p in enumerate(pos):
        by_image.setdefault(int(p), []).append((reader[j].astype(bool), int(labels[j]) + 1))
    order = np.asarray(sorted(by_image), dtype=np.int64)
    return order, [by_image[int(p)] for p in order]


def run(params: Params, index_path: Path, masks_path: Path, clusters_path: Path, weights_dir: Path, out: Path) -> None:
    device = runtime.setup(params.base)
    cfg = dataclasses.replace(params.distill, seed=params.base.seed)
    index = read_index(index_path)
    with open_artifact(masks_path, "useg.masks", index.fingerprint) as masks, open_artifact(
        clusters_path, "useg.clusters", index.fingerprint
    ) as clusters:
        k = int(clusters.attrs["num_clusters"])
        scene = bool(clusters.attrs["scene_centric"])
        positions, targets = load_targets(index, masks, clusters)
    ds = index.dataset
    with training_curves("results/distill") as live:
        model = train_maskrcnn(
            lambda i: ds.load_image(ds.samples[int(positions[i])]), targets, cfg,
            backbone_weights=weights_dir / "mobilenet_v2_imagenet.pt", num_classes=k, log=live, device=device,
        )
    if not dist.is_main():  # rank 0 writes the checkpoint
        return
    state = {"state_dict": model.state_dict(), "num_clusters": k, "scene_centric": scene,
             "config": dataclasses.asdict(cfg), "dataset_fingerprint": index.fingerprint}
    save_checkpoint(state, out)
    Console(stderr=True).print(f"distill: Mask R-CNN on {len(positions)} images, {k} pseudo-classes -> {out}")
