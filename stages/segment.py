"""Stage `segment`: the final segmenter (DeepLabv3, MobileNetV2 ImageNet) trained on the pseudo-labels.

OHEM cross-entropy on the hardest 20% of pixels, ignore 255, SGD with a poly schedule; curves in
results/segment through DVCLive. `crf.rounds` > 0 adds CRF self-training rounds: the segmenter's
CRF-refined predictions on the train images become the next round's labels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from rich.console import Console

from pipeline import dist, runtime
from pipeline.artifacts import RaggedReader, load_checkpoint, open_artifact, save_checkpoint
from pipeline.config import Params
from pipeline.crf import crf_self_training_labels
from pipeline.index import read_index
from pipeline.progress import track
from pipeline.pseudo import segmenter_classes, training_target
from pipeline.segmenter import build_deeplab, train_segmenter
from pipeline.tracking import training_curves


def save_segmenter(model: torch.nn.Module, num_classes: int, params: Params, fingerprint: str, out: Path) -> None:
    state = {"state_dict": model.state_dict(), "num_classes": num_classes,
             "config": dataclasses.asdict(params.segment), "dataset_fingerprint": fingerprint}
    save_checkpoint(state, out)


def load_segmenter(path: Path, fingerprint: str | None = None) -> tuple[torch.nn.Module, dict]:
    state = load_checkpoint(path, fingerprint, "segmenter", "train-segmenter")
    model = build_deeplab(int(state["num_classes"]), None, output_stride=int(state["config"]["output_stride"]))
    model.load_state_dict(state["state_dict"])
    return model.eval(), state


def run(params: Params, index_path: Path, pseudo_path: Path, weights_dir: Path, out: Path) -> None:
    device = runtime.setup(params.base)
    cfg = dataclasses.replace(params.segment, seed=params.base.seed)
    index = read_index(index_path)
    ds = index.dataset
    with open_artifact(pseudo_path, "useg.pseudolabels", index.fingerprint) as f:
        positions = f["positions"][()]
        scene = bool(f.attrs["scene_centric"])
        k = int(f.attrs["num_clusters"])
        reader = RaggedReader(f, "labels")
        labels = [training_target(reader[j], scene) for j in range(len(positions))]
    num_classes = segmenter_classes(k, scene)
    images = lambda j: ds.load_image(ds.samples[int(positions[j])])  # noqa: E731
    with training_curves("results/segment") as live:
        model = train_segmenter(images, lambda j: labels[j], num_classes, cfg,
                                backbone_weights=weights_dir / "mobilenet_v2_imagenet.pt", log=live,
                                device=device, num_images=len(positions))
        for r in range(params.crf.rounds):
            imgs = [images(j) for j in range(len(positions))]
            labels = list(track(crf_self_training_labels(model, imgs, params.crf, device=device),
                                f"segment: CRF round {r + 1} labels", total=len(imgs)))
            model = train_segmenter(images, lambda j: labels[j], num_classes, cfg, log=live, device=device,
                                    num_images=len(positions), model=model)
    if not dist.is_main():  # rank 0 writes the checkpoint
        return
    save_segmenter(model, num_classes, params, index.fingerprint, out)
    Console(stderr=True).print(f"segment: DeepLabv3-MobileNetV2 on {len(positions)} images, {num_classes} classes, "
                               f"{params.crf.rounds} CRF rounds -> {out}")
