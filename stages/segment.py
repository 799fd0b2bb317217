"""Stage `segment`: the final segmenter trained on the pseudo-labels.

`segment.model: deeplabv3` (the paper's): DeepLabv3 on MobileNetV2 ImageNet, OHEM cross-entropy
on the hardest 20% of pixels, ignore 255, SGD with a poly schedule; curves in results/segment
through DVCLive. `segment.model: token_head` (our variant): a linear head on the frozen DINOv2
patch tokens of features.h5, trained as the supervised `probe` is (its params), but on the
pseudo-labels. `crf.rounds` > 0 adds CRF self-training rounds: the segmenter's CRF-refined
predictions on the train images become the next round's labels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from pipeline import dist, runtime
from pipeline.artifacts import RaggedReader, load_checkpoint, open_artifact, save_checkpoint
from pipeline.config import Params
from pipeline.crf import crf_labels, crf_self_training_labels
from pipeline.index import read_index
from pipeline.probe import ProbeConfig, ProbeModel, iter_probe_probs, train_linear_probe
from pipeline.progress import track
from pipeline.pseudo import segmenter_classes, training_target
from pipeline.segmenter import build_deeplab, train_segmenter
from pipeline.tracking import training_curves

TOKEN_HEAD = "token_head"


def save_segmenter(model: torch.nn.Module | ProbeModel, num_classes: int, params: Params, fingerprint: str, out: Path,
                   features: dict | None = None) -> None:
    """Write the checkpoint: DeepLabv3 weights, or a token head's arrays and the features it reads."""
    state = {"num_classes": num_classes, "config": dataclasses.asdict(params.segment), "dataset_fingerprint": fingerprint}
    if isinstance(model, ProbeModel):
        state.update(token_head=model.to_state(), features=features)
    else:
        state["state_dict"] = model.state_dict()
    save_checkpoint(state, out)


def is_token_head(state: dict) -> bool:
    return state["config"].get("model", "deeplabv3") == TOKEN_HEAD


def load_segmenter(path: Path, fingerprint: str | None = None) -> tuple[torch.nn.Module | ProbeModel, dict]:
    """The segmenter of a checkpoint: a DeepLabv3 module (eval mode) or a token head's `ProbeModel`."""
    state = load_checkpoint(path, fingerprint, "segmenter", "train-segmenter")
    if is_token_head(state):
        return ProbeModel.from_state(state["token_head"]), state
    model = build_deeplab(int(state["num_classes"]), None, output_stride=int(state["config"]["output_stride"]))
    model.load_state_dict(state["state_dict"])
    return model.eval(), state


def features_description(f) -> dict:
    """What a token head needs to match in the features it is applied to."""
    return {key: np.asarray(f.attrs[key]).tolist() for key in ("backbone", "grid", "input_size") if key in f.attrs}


def run(params: Params, index_path: Path, pseudo_path: Path, weights_dir: Path, out: Path,
        features_path: Path) -> None:
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
    if cfg.model == TOKEN_HEAD:
        model, features = train_token_head(params, index, features_path, positions, labels, images, num_classes, device)
        what = f"a linear head on frozen {features.get('backbone', 'backbone')} tokens"
    else:
        features = None
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
        what = "DeepLabv3-MobileNetV2"
    if not dist.is_main():  # rank 0 writes the checkpoint
        return
    save_segmenter(model, num_classes, params, index.fingerprint, out, features)
    Console(stderr=True).print(f"segment: {what} on {len(positions)} images, {num_classes} classes, "
                               f"{params.crf.rounds} CRF rounds -> {out}")


def train_token_head(params: Params, index, features_path: Path, positions: np.ndarray, labels: list[np.ndarray],
                     images, num_classes: int, device: torch.device) -> tuple[ProbeModel, dict]:
    """`segment.model: token_head`: the probe's linear head and training on the pseudo-labels.

    Each CRF self-training round relabels the train images with the CRF-refined head (its
    logits upsampled to the image) and trains a new head on them from the same seed.
    Returns the head and the description of the features it was trained on.
    """
    pcfg = ProbeConfig.from_params(params.probe, params.base.seed, device)
    order = np.argsort(positions, kind="stable")  # h5py reads rows in increasing order
    with open_artifact(features_path, "useg.features", index.fingerprint) as f:
        grid = tuple(int(v) for v in f.attrs["grid"])
        features = features_description(f)
        tokens = np.empty((len(positions),) + f["patch_tokens"].shape[1:], dtype=np.float16)
        tokens[order] = f["patch_tokens"][np.asarray(positions)[order]]
    with training_curves("results/segment") as live:
        def on_epoch(epoch: int, loss: float) -> None:
            if live is not None:
                live({"epoch": epoch, "loss": loss})

        model = train_linear_probe(tokens, grid, labels, num_classes, pcfg, on_epoch=on_epoch)
        for r in range(params.crf.rounds):
            sizes = [lab.shape for lab in labels]
            probs = iter_probe_probs(model, tokens, sizes)
            labels = [crf_labels(images(j), p, params.crf).astype(np.uint8)
                      for j, p in track(enumerate(probs), f"segment: CRF round {r + 1} labels", total=len(sizes))]
            model = train_linear_probe(tokens, grid, labels, num_classes, pcfg, on_epoch=on_epoch)
    return model, features
