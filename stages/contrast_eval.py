"""Stage `contrast_eval`: MaskContrast's three evaluations of its pixel embeddings.

One pass of the frozen model over the train and eval splits (images resized to
`features.input_size`, outputs bilinearly upsampled to the original size), then:

- **K-means** (unsupervised, MaskContrast's headline number): per image, the prototype is the
  saliency-weighted mean of the L2-normalised embeddings over the predicted salient pixels;
  PCA to `pca_dim` whitened dimensions, L2 normalisation, K-means with K = classes - 1
  (the foreground classes) for `kmeans_seeds` seeds; the salient pixels of an image take its
  cluster + 1, the rest 0 (background); Hungarian matching by IoU; mean and std over the
  seeds. Our deviation: PCA and K-means are fitted on the *train* prototypes and the eval
  prototypes are assigned to the nearest centroid (the official code fits on the evaluated
  images themselves; here no eval image is used for fitting).
- **Linear probe**: a 1x1 conv on the frozen embeddings at the head's stride, trained on the
  train split's GT (`probe` params), logits upsampled bilinearly, identity matching.
- **Retrieval**: the predicted salient region of each train image and its complement are
  masks; each becomes a bank entry (its mean embedding) labelled with the majority GT class
  inside it. Each eval mask takes the class of its nearest bank entry by cosine similarity.
  (The paper's bank holds the salient masks and the rest of the image is background; keeping
  the complement as a mask lets scene-centric datasets without a background class work too:
  on object-centric data the complements retrieve background.)

Writes `metrics.json` and `per_class.json` to the metrics folder, and the K-means label maps
of the base seed as predictions (`maskcontrast_kmeans`) for the shared `evaluate` stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from pipeline import runtime
from pipeline.artifacts import Provenance, RaggedWriter, staged_folder, string_dataset, write_artifact, write_json
from pipeline.baseline import fit_kmeans
from pipeline.clustering import assign_clusters
from pipeline.config import Params
from pipeline.errors import DataError
from pipeline.index import read_index
from pipeline.maskcontrast import (
    embed_image,
    majority_label,
    pca_whiten,
    region_prototype,
    retrieve,
    saliency_prototype,
)
from pipeline.metrics import confusion_matrix, hungarian_match, identity_match
from pipeline.probe import ProbeConfig, evaluate_probe, train_linear_probe
from pipeline.progress import track
from stages.contrast import load_contrast

SCHEMA = "useg.predictions"
METHOD = "maskcontrast_kmeans"


@dataclass
class SplitPass:
    """What one pass of the model over a split keeps (nothing at full resolution but masks)."""

    tokens: list[np.ndarray] = field(default_factory=list)  # (h*w, D) float16 per image
    prototypes: list[np.ndarray | None] = field(default_factory=list)  # saliency prototype or None
    regions: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)  # (prototype, bool mask)
    salient: list[np.ndarray] = field(default_factory=list)  # bool (H, W), kept for the eval split only
    grid: tuple[int, int] = (0, 0)


def embed_split(model, ds, positions, size, threshold: float, device, keep_masks: bool, what: str) -> SplitPass:
    out = SplitPass()
    for pos in track(positions, f"contrast_eval: embed {what}"):
        image = ds.load_image(ds.samples[int(pos)])
        low, emb, sal = embed_image(model, image, size, device)
        out.grid = (int(low.shape[1]), int(low.shape[2]))
        out.tokens.append(low.permute(1, 2, 0).reshape(-1, low.shape[0]).numpy().astype(np.float16))
        out.prototypes.append(saliency_prototype(emb, sal, threshold))
        salient = sal > threshold
        regions = []
        for region in (salient, ~salient):
            proto = region_prototype(emb, region)
            if proto is not None:
                regions.append((proto, region.numpy()))
        out.regions.append(regions)
        if keep_masks:
            out.salient.append(salient.numpy())
    return out


def kmeans_labels(train: SplitPass, evals: SplitPass, k: int, pca_dim: int, iters: int, seed: int) -> list[np.ndarray]:
    """Label maps of the eval images: cluster + 1 on the salient pixels, 0 elsewhere."""
    fit = np.stack([p for p in train.prototypes if p is not None])
    if fit.shape[0] < k:
        raise DataError(f"contrast_eval: {fit.shape[0]} train images have a salient region, fewer than K = {k}")
    project = pca_whiten(fit, pca_dim, seed)
    centroids = fit_kmeans(project(fit), k, iters, seed=seed, spherical=True)
    maps = []
    for proto, salient in zip(evals.prototypes, evals.salient):
        label = np.zeros(salient.shape, dtype=np.uint16)
        if proto is not None:
            cluster = int(assign_clusters(project(proto[None]), centroids)[0][0])
            label[salient] = cluster + 1
        maps.append(label)
    return maps


def _score(pred_maps, gts, num_pred: int, num_classes: int, how: str):
    conf = np.zeros((num_pred, num_classes), dtype=np.int64)
    for pred, gt in zip(pred_maps, gts):
        conf += confusion_matrix(pred, gt, num_pred, num_classes)
    return hungarian_match(conf, by="iou") if how == "iou" else identity_match(conf)


def run(params: Params, index_path: Path, model_path: Path, out: Path, metrics_dir: Path) -> dict:
    device = runtime.setup(params.base)
    cfg = params.contrast_eval
    index = read_index(index_path)
    ds = index.dataset
    if not ds.has_labels:
        raise DataError(f"dataset {ds.name!r} has no masks: contrast_eval scores against GT")
    c = ds.num_classes
    k = cfg.num_clusters or c - 1
    if k < 1:
        raise DataError(f"contrast_eval: K = {k} clusters (dataset {ds.name!r} has {c} classes)")
    model, _ = load_contrast(model_path, index.fingerprint)
    model.to(device)
    size = tuple(params.features.input_size)
    train_pos = index.positions(params.base.train_split)
    eval_pos = index.positions(params.base.eval_split)
    with torch.inference_mode():
        train = embed_split(model, ds, train_pos, size, cfg.saliency_threshold, device, False, params.base.train_split)
        evals = embed_split(model, ds, eval_pos, size, cfg.saliency_threshold, device, True, params.base.eval_split)
    train_gt = [ds.load_mask(ds.samples[int(i)]) for i in track(train_pos, "contrast_eval: train GT")]
    eval_gt = [ds.load_mask(ds.samples[int(i)]) for i in track(eval_pos, "contrast_eval: eval GT")]

    # K-means over seeds
    seeds = [params.base.seed + s for s in range(cfg.kmeans_seeds)]
    runs, first_maps = [], None
    for seed in seeds:
        maps = kmeans_labels(train, evals, k, cfg.pca_dim, cfg.kmeans_iters, seed)
        runs.append(_score(maps, eval_gt, k + 1, c, "iou"))
        first_maps = first_maps if first_maps is not None else maps
    mious = np.array([r.miou for r in runs])
    accs = np.array([r.pixel_accuracy for r in runs])

    # linear probe on the frozen embeddings
    pcfg = ProbeConfig.from_params(params.probe, params.base.seed, device)
    probe = train_linear_probe(np.stack(train.tokens), train.grid, train_gt, c, pcfg)
    probe_res = evaluate_probe(probe, np.stack(evals.tokens), eval_gt)

    # retrieval from a bank of train masks labelled with their majority GT class
    bank, bank_labels = [], []
    for regions, gt in zip(train.regions, train_gt):
        for proto, region in regions:
            label = majority_label(gt, region, c)
            if label >= 0:
                bank.append(proto)
                bank_labels.append(label)
    if not bank:
        raise DataError("contrast_eval: no train mask covers a labelled pixel: the retrieval bank is empty")
    bank_arr, labels_arr = np.stack(bank), np.asarray(bank_labels)
    retrieved = []
    for regions, gt in zip(evals.regions, eval_gt):
        pred = np.full(gt.shape, 255, dtype=np.uint16)
        if regions:
            classes = retrieve(np.stack([p for p, _ in regions]), bank_arr, labels_arr)
            for (_, region), cls in zip(regions, classes):
                pred[region] = cls
        retrieved.append(pred)
    retrieval_res = _score(retrieved, eval_gt, c, c, "identity")

    metrics = {"maskcontrast": {
        "kmeans": {"miou": round(float(mious.mean()), 4), "miou_std": round(float(mious.std()), 4),
                   "miou_per_seed": [round(float(v), 4) for v in mious],
                   "pixel_accuracy": round(float(accs.mean()), 4), "k": k, "matching": "iou"},
        "linear_probe": {"miou": round(float(probe_res.miou), 4),
                         "pixel_accuracy": round(float(probe_res.pixel_accuracy), 4), "matching": "identity"},
        "retrieval": {"miou": round(float(retrieval_res.miou), 4),
                      "pixel_accuracy": round(float(retrieval_res.pixel_accuracy), 4),
                      "bank_size": len(bank), "matching": "identity"},
    }}
    per_class = {"kmeans_seed0": runs[0].to_dict(ds.class_names), "linear_probe": probe_res.to_dict(ds.class_names),
                 "retrieval": retrieval_res.to_dict(ds.class_names)}
    with staged_folder(metrics_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "per_class.json", per_class)

    prov = Provenance("contrast_eval", params.section_json("contrast_eval"), index.fingerprint,
                      {"index": str(index_path), "model": str(model_path)})
    with write_artifact(out, SCHEMA, prov) as f:
        string_dataset(f, "ids", [ds.samples[int(i)].id for i in eval_pos])
        f.create_dataset("positions", data=eval_pos, track_times=False)
        f.attrs["methods"] = METHOD
        g = f.create_group(METHOD)
        g.attrs["num_clusters"] = k + 1
        w = RaggedWriter(g, "labels", np.uint16, 2)
        for label in first_maps:
            w.append(label)
        w.close()
    Console(stderr=True).print(
        f"contrast_eval: {ds.name} {params.base.eval_split}: K-means mIoU {mious.mean():.1f} +- {mious.std():.1f} "
        f"({len(seeds)} seeds, K = {k}), linear probe {probe_res.miou:.1f}, retrieval {retrieval_res.miou:.1f}"
    )
    return metrics
