"""Stage `contrast`: train the MaskContrast model on the saliency masks of `contrast_mine`.

Reads the index, the masks artifact (one saliency mask per train image; several masks of one
image are merged) and the MobileNetV2 ImageNet weights; writes the model checkpoint and
DVCLive curves to results/contrast.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from rich.console import Console

from pipeline import dist, runtime
from pipeline.artifacts import RaggedReader, load_checkpoint, open_artifact, save_checkpoint
from pipeline.config import Params
from pipeline.errors import ArtifactError, DataError, ParamsError
from pipeline.index import read_index
from pipeline.maskcontrast import ContrastModel, build_contrast_model, train_maskcontrast
from pipeline.models.backbones import create_backbone
from pipeline.tracking import training_curves


def load_saliency_masks(index, masks_path: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """(image positions, one bool mask per image): the union of each image's masks."""
    with open_artifact(masks_path, "useg.masks", index.fingerprint) as f:
        image_index = f["image_index"][()]
        reader = RaggedReader(f, "masks")
        merged: dict[int, np.ndarray] = {}
        for j, pos in enumerate(image_index.tolist()):
            m = reader[j].astype(bool)
            merged[pos] = merged[pos] | m if pos in merged else m
    positions = np.asarray(sorted(merged), dtype=np.int64)
    for pos in positions.tolist():
        hw = (int(index.heights[pos]), int(index.widths[pos]))
        if merged[pos].shape != hw:
            raise ArtifactError(f"{masks_path}: mask of image {index.ids[pos]!r} is {merged[pos].shape}, the image {hw}")
    return positions, [merged[p] for p in positions.tolist()]


def save_contrast(model: ContrastModel, cfg, fingerprint: str, out: Path, vit_name: str | None = None) -> None:
    save_checkpoint({"state_dict": model.state_dict(), "config": dataclasses.asdict(cfg), "vit": vit_name,
                     "dataset_fingerprint": fingerprint}, out)


def contrast_vit(params: Params):
    """The frozen ViT trunk of `contrast.backbone: features` (the features stage's backbone), or None."""
    if params.contrast.backbone != "features":
        return None
    f = params.features
    vit = create_backbone(f.backbone, f.checkpoint or None)
    if vit.num_heads is None:
        raise ParamsError(f"params key 'contrast.backbone': features needs a ViT features.backbone, not {f.backbone!r}")
    if params.contrast.crop_size % vit.patch_size:
        raise ParamsError(f"params key 'contrast.crop_size': {params.contrast.crop_size} is not a multiple of "
                          f"the ViT patch size {vit.patch_size}")
    return vit


def load_contrast(path: Path, fingerprint: str | None = None) -> tuple[ContrastModel, dict]:
    state = load_checkpoint(path, fingerprint, "MaskContrast", "contrast")
    vit = create_backbone(state["vit"]) if state.get("vit") else None
    model = build_contrast_model(None, output_stride=int(state["config"]["output_stride"]), vit=vit)
    model.load_state_dict(state["state_dict"])
    return model.eval(), state


def run(params: Params, index_path: Path, masks_path: Path, weights_dir: Path, out: Path) -> None:
    device = runtime.setup(params.base)
    cfg = dataclasses.replace(params.contrast, seed=params.base.seed)
    index = read_index(index_path)
    ds = index.dataset
    positions, masks = load_saliency_masks(index, masks_path)
    if len(positions) < 2:
        raise DataError(f"{masks_path}: {len(positions)} train images have a saliency mask; MaskContrast needs >= 2")

    def load(j: int) -> tuple[np.ndarray, np.ndarray]:
        return ds.load_image(ds.samples[int(positions[j])]), masks[j]

    vit = contrast_vit(params)
    with training_curves("results/contrast") as live:
        model = train_maskcontrast(load, len(positions), cfg, backbone_weights=weights_dir / "mobilenet_v2_imagenet.pt",
                                   log=live, device=device, vit=vit)
    if not dist.is_main():  # rank 0 writes the checkpoint
        return
    save_contrast(model, cfg, index.fingerprint, out, params.features.backbone if vit is not None else None)
    Console(stderr=True).print(
        f"contrast: MaskContrast (DeepLabv3 on {params.features.backbone if vit is not None else 'MobileNetV2'}) on {len(positions)} images with a saliency mask, "
        f"{cfg.epochs} epochs -> {out}"
    )
