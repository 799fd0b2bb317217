"""TransFGU stages: `concepts` -> `cams` -> `transfgu` (decoder training) -> `transfgu_predict`.

- concepts: thing (and, scene-centric, stuff) window crops of every train image, their CLS
  tokens, K-means into concepts -> concepts.h5 (schema useg.concepts).
- cams: every concept's gradient CAM on every train image at `transfgu.input_size` (default: `features.input_size`) ->
  cams.h5 (schema useg.cams), float16 maps on the token grid.
- transfgu: the mask-transformer decoder on the frozen backbone, trained on the CAM
  pseudo-labels with bootstrapping -> models/transfgu.pt, curves in results/transfgu.
- transfgu_predict: the decoder on the eval split's patch tokens from features.h5, logits
  upsampled bilinearly to each image's original size -> predictions (method `transfgu`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from rich.console import Console

from pipeline import dist, runtime
from pipeline.artifacts import (
    Provenance,
    create_dataset,
    load_checkpoint,
    open_artifact,
    save_checkpoint,
    write_artifact,
    write_predictions,
)
from pipeline.config import Params
from pipeline.errors import ArtifactError, DataError, ParamsError
from pipeline.features import preprocess
from pipeline.index import ImageIndex, read_index
from pipeline.progress import track
from pipeline.tracking import training_curves
from pipeline.transfgu import (
    MaskTransformerDecoder,
    concept_cams,
    discover_concepts,
    train_transfgu,
    upsample,
    window_embeddings,
)
from stages.features import load_backbone


def _vit(params: Params, device: torch.device):
    model = load_backbone(params, device)
    if model.num_heads is None:
        raise ParamsError(f"params key 'features.backbone': TransFGU needs a ViT, not {params.features.backbone!r}")
    return model


def input_size(params: Params, patch: int) -> tuple[int, int]:
    """The image size of concept discovery and CAMs: `transfgu.input_size`, else `features.input_size`."""
    size = tuple(params.transfgu.input_size or params.features.input_size)
    if size[0] % patch or size[1] % patch:
        raise ParamsError(f"params key 'transfgu.input_size': {list(size)} is not a multiple of the patch size {patch}")
    return size


def concept_counts(params: Params, num_classes: int) -> tuple[int, int]:
    """(things, stuff) concept counts: from params, C - 1 things (object-centric), or C concepts
    from every window (`transfgu.windows: all`)."""
    cfg = params.transfgu
    if cfg.windows == "all":  # implies scene_centric (checked when params load)
        return (cfg.num_things or num_classes), 0  # every window, one K-means (the official Cityscapes recipe)
    if cfg.scene_centric:
        if cfg.num_things < 1 or cfg.num_stuff < 1:
            raise ParamsError("params key 'transfgu.num_things': scene_centric needs num_things and num_stuff >= 1 "
                              "(their sum is the number of classes), or transfgu.windows 'all'")
        return cfg.num_things, cfg.num_stuff
    return (cfg.num_things or num_classes - 1), 0


def run_concepts(params: Params, index_path: Path, out: Path) -> None:
    device = runtime.setup(params.base)
    cfg = params.transfgu
    index = read_index(index_path)
    ds = index.dataset
    n_things, n_stuff = concept_counts(params, ds.num_classes)
    if n_things < 1:
        raise DataError(f"transfgu: {n_things} thing concepts (dataset {ds.name!r} has {ds.num_classes} classes)")
    vit = _vit(params, device)
    if cfg.crop_size % vit.patch_size:
        raise ParamsError(f"params key 'transfgu.crop_size': {cfg.crop_size} is not a multiple of the patch size {vit.patch_size}")
    train = index.positions(params.base.train_split)
    if 0 < cfg.concept_images < len(train):
        rng = np.random.default_rng(params.base.seed)
        train = np.sort(rng.choice(train, cfg.concept_images, replace=False))
    size = input_size(params, vit.patch_size)
    things, stuff = [], []
    with torch.inference_mode(), runtime.autocast(params.base, device):
        for pos in track(train, "concepts: window crops"):
            x = preprocess(ds.load_image(ds.samples[int(pos)]), size)[None].to(device)
            t, s = window_embeddings(vit, x, cfg)
            things.append(t.float().numpy())
            stuff.append(s.float().numpy())
    things_x, stuff_x = np.concatenate(things), np.concatenate(stuff)
    thing_c = discover_concepts(things_x, n_things, cfg.kmeans_iters, params.base.seed)
    stuff_c = discover_concepts(stuff_x, n_stuff, cfg.kmeans_iters, params.base.seed) if n_stuff else np.zeros((0, thing_c.shape[1]), np.float32)
    prov = Provenance("concepts", params.section_json("transfgu"), index.fingerprint, {"index": str(index_path)})
    with write_artifact(out, "useg.concepts", prov) as f:
        f.attrs["scene_centric"] = bool(cfg.scene_centric)
        f.attrs["backbone"] = params.features.backbone
        f.attrs["num_thing_crops"] = int(things_x.shape[0])
        f.attrs["num_stuff_crops"] = int(stuff_x.shape[0])
        f.create_dataset("things", data=thing_c, track_times=False)
        f.create_dataset("stuff", data=stuff_c, track_times=False)
    Console(stderr=True).print(f"concepts: {things_x.shape[0]} thing crops -> {n_things} concepts, "
                               f"{stuff_x.shape[0]} stuff crops -> {n_stuff} concepts ({len(train)} images) -> {out}")


def _read_concepts(path: Path, index: ImageIndex) -> tuple[np.ndarray, bool]:
    with open_artifact(path, "useg.concepts", index.fingerprint) as f:
        concepts = np.concatenate([f["things"][()], f["stuff"][()]])
        return concepts, bool(f.attrs["scene_centric"])


def run_cams(params: Params, index_path: Path, concepts_path: Path, out: Path) -> None:
    device = runtime.setup(params.base)
    cfg = params.transfgu
    index = read_index(index_path)
    ds = index.dataset
    concepts, scene = _read_concepts(concepts_path, index)
    vit = _vit(params, device)
    train = index.positions(params.base.train_split)
    size = input_size(params, vit.patch_size)
    grid = (size[0] // vit.patch_size, size[1] // vit.patch_size)
    c = torch.from_numpy(concepts)
    prov = Provenance("cams", params.section_json("transfgu"), index.fingerprint,
                      {"index": str(index_path), "concepts": str(concepts_path)})
    with write_artifact(out, "useg.cams", prov) as f:
        f.attrs["scene_centric"] = scene
        f.attrs["grid"] = np.asarray(grid, dtype=np.int64)
        f.create_dataset("positions", data=train, track_times=False)
        d = create_dataset(f, "cams", (len(train), len(concepts), *grid), np.float16)
        for j, pos in enumerate(track(train, "cams: concept CAMs")):
            x = preprocess(ds.load_image(ds.samples[int(pos)]), size)[None].to(device)
            with runtime.autocast(params.base, device):
                cam = concept_cams(vit, x, c, cfg.cam_mass, cfg.cam_batch)
            d[j] = cam.float().cpu().numpy().astype(np.float16)
    Console(stderr=True).print(f"cams: {len(concepts)} concepts on {len(train)} images (grid {grid[0]}x{grid[1]}) -> {out}")


def run_train(params: Params, index_path: Path, cams_path: Path, out: Path) -> None:
    device = runtime.setup(params.base)
    cfg = dataclasses.replace(params.transfgu, seed=params.base.seed)
    index = read_index(index_path)
    ds = index.dataset
    with open_artifact(cams_path, "useg.cams", index.fingerprint) as f:
        positions = f["positions"][()]
        cams = torch.from_numpy(f["cams"][()].astype(np.float32))
        scene = bool(f.attrs["scene_centric"])
    if scene != cfg.scene_centric:
        raise ArtifactError(f"{cams_path}: made with transfgu.scene_centric {scene}: re-run concepts and cams")
    vit = _vit(params, device)

    def tokens_fn(x: torch.Tensor) -> torch.Tensor:
        with runtime.autocast(params.base, device):
            return vit(x).patch_tokens

    def cams_fn(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = ds.load_image(ds.samples[int(positions[j])])
        return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 255.0, cams[j]

    with training_curves("results/transfgu") as live:
        decoder = train_transfgu(tokens_fn, cams_fn, len(positions), cfg, vit.embed_dim, vit.patch_size,
                                 log=live, device=device)
    if not dist.is_main():  # rank 0 writes the checkpoint
        return
    save_checkpoint({"state_dict": decoder.state_dict(), "config": dataclasses.asdict(cfg), "in_dim": vit.embed_dim,
                     "num_classes": decoder.num_classes, "scene_centric": scene,
                     "backbone": params.features.backbone, "backbone_checkpoint": params.features.checkpoint,
                     "dataset_fingerprint": index.fingerprint}, out)
    Console(stderr=True).print(f"transfgu: decoder on {len(positions)} images, {decoder.num_classes} classes -> {out}")


def load_decoder(path: Path, fingerprint: str | None) -> tuple[MaskTransformerDecoder, dict]:
    state = load_checkpoint(path, fingerprint, "TransFGU", "transfgu")
    c = state["config"]
    decoder = MaskTransformerDecoder(int(state["in_dim"]), int(state["num_classes"]), c["d_model"],
                                     c["decoder_depth"], c["decoder_heads"], c["dropout"])
    decoder.load_state_dict(state["state_dict"])
    return decoder.eval(), state


class TransFGUSegmenter(torch.nn.Module):
    """ViT + decoder as one segmenter: ImageNet-normalised (B, 3, H, W) -> (B, K, H, W) logits.

    The input is resized to the nearest multiple of the patch size for the ViT; the decoder's
    logits are upsampled bilinearly back to (H, W).
    """

    def __init__(self, vit: torch.nn.Module, decoder: MaskTransformerDecoder) -> None:
        super().__init__()
        self.vit = vit
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.vit.patch_size
        hw = (max(p, round(h / p) * p), max(p, round(w / p) * p))
        xi = torch.nn.functional.interpolate(x, size=hw, mode="bilinear", align_corners=False) if hw != (h, w) else x
        out = self.vit(xi)
        logits, _ = self.decoder(out.patch_tokens.float(), out.grid)
        return upsample(logits.float(), (h, w))


def load_transfgu_segmenter(path: Path) -> tuple[TransFGUSegmenter, dict]:
    """The decoder of `path` on the ViT it was trained with (for `useg segment --method transfgu`)."""
    from pipeline.models.backbones import create_backbone

    decoder, state = load_decoder(path, None)
    vit = create_backbone(state["backbone"], state.get("backbone_checkpoint") or None)
    return TransFGUSegmenter(vit, decoder).eval(), state


def run_predict(params: Params, index_path: Path, features_path: Path, model_path: Path, out: Path) -> None:
    device = runtime.setup(params.base)
    index = read_index(index_path)
    ds = index.dataset
    decoder, state = load_decoder(model_path, index.fingerprint)
    decoder.to(device)
    k = int(state["num_classes"])
    eval_pos = index.positions(params.base.eval_split)
    prov = Provenance("transfgu_predict", params.section_json("transfgu"), index.fingerprint,
                      {"index": str(index_path), "features": str(features_path), "model": str(model_path)})

    def compute(block) -> Iterator[dict[str, np.ndarray]]:
        """{"transfgu": labels at original size} per eval image of `block`."""
        with open_artifact(features_path, "useg.features", index.fingerprint) as feats, torch.inference_mode():
            grid = tuple(int(v) for v in feats.attrs["grid"])
            for pos in track(block, "transfgu_predict"):
                pos = int(pos)
                t = torch.from_numpy(feats["patch_tokens"][pos].astype(np.float32))[None].to(device)
                logits, _ = decoder(t, grid)
                hw = (int(index.heights[pos]), int(index.widths[pos]))
                yield {"transfgu": upsample(logits.float(), hw)[0].argmax(0).cpu().numpy().astype(np.uint16)}

    records = dist.sharded(eval_pos, compute, out)
    if records is None:  # another rank writes the artifact
        return
    write_predictions(out, prov, [ds.samples[int(i)].id for i in eval_pos], eval_pos, {"transfgu": k}, records)
    Console(stderr=True).print(f"transfgu_predict: {len(eval_pos)} {params.base.eval_split} images, {k} classes -> {out}")
