"""Stage `cluster`: an embedding per mask, whitening, K-means -> `clusters.h5`.

Embeddings: `cls_crop` (MaskDistill: the backbone's CLS token on the mask's bounding-box crop)
or `pooled` (mask-pooled patch tokens from features.h5: fast). Per-dimension whitening and L2
normalisation, then spherical faiss K-means with K from params (times the over-clustering
factor). Writes the cluster id and distance (1 - cosine) per mask and the centroids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from pipeline import runtime
from pipeline.artifacts import Provenance, open_artifact, write_artifact
from pipeline.clustering import cluster_masks, crop_box_for_cls, pooled_embeddings
from pipeline.config import Params
from pipeline.errors import ArtifactError, ParamsError
from pipeline.features import preprocess
from pipeline.index import ImageIndex, read_index
from pipeline.progress import track

SCHEMA = "useg.clusters"


def num_pseudo_classes(params: Params, index: ImageIndex, scene_centric: bool) -> int:
    """K: from params, or the dataset's classes (all in scene-centric mode, else minus background)."""
    k = params.cluster.num_clusters
    if k:
        return k
    c = index.dataset.num_classes
    if c < 2:
        raise ParamsError("params key 'cluster.num_clusters': 0 (= from the dataset's classes) needs a labelled dataset; set it")
    return c if scene_centric else c - 1


def cls_crop_embeddings(params: Params, index: ImageIndex, masks, device: torch.device) -> np.ndarray:
    """CLS token of the backbone on each mask's bounding-box crop (resized to crop_size^2).

    The backbone is `cluster.backbone` when set, else the features backbone; a CNN has no CLS
    token, so its embedding is the global average of its last feature map.
    """
    from pipeline.models.backbones import create_backbone
    from stages.features import load_backbone

    cfg = params.cluster
    if cfg.backbone:
        model = create_backbone(cfg.backbone, cfg.checkpoint or None).eval().to(device)
    else:
        model = load_backbone(params, device)
    if cfg.crop_size % model.patch_size:
        raise ParamsError(f"params key 'cluster.crop_size': {cfg.crop_size} is not a multiple of the patch size {model.patch_size}")
    pos = masks["image_index"][()]
    boxes = masks["box"][()]
    out = np.zeros((len(pos), model.embed_dim), dtype=np.float32)
    cache: tuple[int, np.ndarray] | None = None
    batches = range(0, len(pos), cfg.batch_size)
    with torch.inference_mode(), runtime.autocast(params.base, device):
        for start in track(batches, "cluster: CLS on mask crops"):
            xs = []
            for j in range(start, min(start + cfg.batch_size, len(pos))):
                p = int(pos[j])
                if cache is None or cache[0] != p:
                    cache = (p, index.dataset.load_image(index.dataset.samples[p]))
                crop = crop_box_for_cls(cache[1], boxes[j], cfg.crop_pad)
                xs.append(preprocess(crop, (cfg.crop_size, cfg.crop_size)))
            o = model(torch.stack(xs).to(device))
            emb = o.cls if o.cls is not None else o.patch_tokens.mean(1)
            out[start : start + len(xs)] = emb.float().cpu().numpy()
    return out


def pooled(masks, feats, max_bytes: int = 64 << 20) -> np.ndarray:
    """Mask-pooled patch tokens per mask, reading features.h5 and the grid masks a block of images at a time.

    `mine` writes masks in image order; each block reads one slice of the patch tokens and
    one slice of the grid masks, so neither is ever held for the whole dataset.
    """
    pos = masks["image_index"][()]
    grids = masks["grid_masks"]
    tokens = feats["patch_tokens"]
    out = np.zeros((len(pos), tokens.shape[2]), dtype=np.float32)
    if len(pos) == 0:
        return out
    if np.any(np.diff(pos) < 0):
        raise ArtifactError(f"{masks.filename}: masks are not in image order (re-run its stage)")
    images = max(1, max_bytes // (tokens.shape[1] * tokens.shape[2] * 4))
    blocks = range(int(pos[0]), int(pos[-1]) + 1, images)
    for p0 in track(blocks, "cluster: mask-pooled tokens"):
        p1 = min(p0 + images, int(pos[-1]) + 1)
        j0, j1 = np.searchsorted(pos, [p0, p1])
        if j0 == j1:
            continue
        tok = tokens[p0:p1].astype(np.float32)
        g = grids[j0:j1].astype(bool)
        starts = np.flatnonzero(np.r_[True, pos[j0 + 1 : j1] != pos[j0 : j1 - 1]])
        for a, b in zip(starts, np.r_[starts[1:], j1 - j0]):
            out[j0 + a : j0 + b] = pooled_embeddings(tok[int(pos[j0 + a]) - p0], list(g[a:b]))
    return out


def run(params: Params, index_path: Path, features_path: Path, masks_path: Path, out: Path) -> None:
    device = runtime.setup(params.base)
    cfg = params.cluster
    index = read_index(index_path)
    with open_artifact(masks_path, "useg.masks", index.fingerprint) as masks:
        scene = bool(masks.attrs["scene_centric"])
        k = num_pseudo_classes(params, index, scene)
        n = masks["image_index"].shape[0]
        if n < k * cfg.overcluster:
            raise ParamsError(f"params key 'cluster.num_clusters': {k * cfg.overcluster} clusters for only {n} masks in {masks_path}")
        if cfg.embedding == "cls_crop":
            emb = cls_crop_embeddings(params, index, masks, device)
        else:
            with open_artifact(features_path, "useg.features", index.fingerprint) as feats:
                emb = pooled(masks, feats)
    labels, dist, centroids = cluster_masks(
        emb, k, overcluster=cfg.overcluster, seed=params.base.seed, iters=cfg.kmeans_iters, redo=cfg.kmeans_redo
    )
    prov = Provenance(
        "cluster", params.section_json("cluster"), index.fingerprint,
        {"index": str(index_path), "features": str(features_path), "masks": str(masks_path)},
    )
    with write_artifact(out, SCHEMA, prov) as f:
        f.attrs["num_clusters"] = int(centroids.shape[0])
        f.attrs["scene_centric"] = scene
        f.attrs["embedding"] = cfg.embedding
        f.create_dataset("label", data=labels.astype(np.int32), track_times=False)
        f.create_dataset("distance", data=dist.astype(np.float32), track_times=False)
        f.create_dataset("centroids", data=centroids.astype(np.float32), track_times=False)
        f.create_dataset("embedding", data=emb.astype(np.float16), track_times=False, compression="gzip", shuffle=True)
    sizes = np.bincount(labels, minlength=centroids.shape[0])
    Console(stderr=True).print(f"cluster: {n} masks into {centroids.shape[0]} clusters ({cfg.embedding}); sizes {sizes.tolist()}")
