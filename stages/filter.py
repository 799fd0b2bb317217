"""Stage `filter`: the initial model labels the train images; confident masks become pseudo-labels.

MaskDistill: keep detections with score >= `filter.score_threshold` (if none reaches it, only the
best one; `filter.min_keep` > 1: the `min_keep` best when fewer reach it), paste them in
descending score order skipping masks that overlap pixels already pasted; background 0.
Diagnostic only (never used for selection): pseudo-label mIoU against the train split's GT,
before (clustered mined masks) and after filtering, in results/filter/metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from rich.console import Console

from pipeline import dist, runtime
from pipeline.artifacts import (
    Provenance, RaggedReader, RaggedWriter, open_artifact, staged_folder, string_dataset, write_artifact, write_json,
)
from pipeline.config import Params
from pipeline.errors import ArtifactError
from pipeline.index import read_index
from pipeline.maskrcnn import DistillConfig, filter_and_paste, maskrcnn_from_config, predict_instances, select_confident
from pipeline.metrics import confusion_matrix, hungarian_match, majority_match
from pipeline.progress import track
from pipeline.pseudo import paste_cluster_masks

SCHEMA = "useg.pseudolabels"


def load_initial_model(path: Path, fingerprint: str):
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("dataset_fingerprint") != fingerprint:
        raise ArtifactError(f"{path}: trained on another dataset: re-run distill")
    cfg = DistillConfig(**state["config"])
    model = maskrcnn_from_config(int(state["num_clusters"]), cfg)
    model.load_state_dict(state["state_dict"])
    return model.eval(), state


def empty_images_warning(empty: int, total: int, score_floor: float) -> str | None:
    """A warning when the initial model left `empty` of the `total` train images with no detection
    at all (so with an all-background pseudo-label), or None when every image kept at least one."""
    if not empty:
        return None
    msg = (f"filter: warning: {empty} of {total} train images got no detection above "
           f"filter.score_floor {score_floor} from the initial model; their pseudo-labels are all background")
    if empty == total:
        msg += (". Every pseudo-label is background, so the final segmenter can only learn background: "
                "train the initial model longer (distill.epochs) or lower filter.score_floor")
    return msg


def diagnostic(conf: np.ndarray) -> dict:
    """mIoU, accuracy and the precision of the pasted (non-background) pixels after matching."""
    k, c = conf.shape
    res = hungarian_match(conf) if k == c else majority_match(conf)
    rows = np.arange(1, k)
    correct = sum(int(conf[r, res.mapping[r]]) for r in rows if res.mapping[r] >= 0)
    pasted = int(conf[1:].sum())
    return {
        "miou": round(float(res.miou), 4),
        "pixel_accuracy": round(float(res.pixel_accuracy), 4),
        "pasted_pixel_precision": round(100.0 * correct / pasted, 4) if pasted else None,
        "pasted_pixels": pasted,
        "matching": res.method,
    }


def run(params: Params, index_path: Path, masks_path: Path, clusters_path: Path, model_path: Path, out: Path, metrics_dir: Path) -> None:
    device = runtime.setup(params.base)
    cfg = params.filter
    index = read_index(index_path)
    ds = index.dataset
    model, state = load_initial_model(model_path, index.fingerprint)
    model.to(device)
    k = int(state["num_clusters"])
    train = index.positions(params.base.train_split)
    has_gt = ds.has_labels
    c = ds.num_classes
    conf_before = np.zeros((k + 1, c), dtype=np.int64) if has_gt else None
    conf_after = np.zeros((k + 1, c), dtype=np.int64) if has_gt else None
    prov = Provenance(
        "filter", params.section_json("filter"), index.fingerprint,
        {"index": str(index_path), "masks": str(masks_path), "clusters": str(clusters_path), "initial": str(model_path)},
    )
    def compute(block) -> Iterator[tuple[int, np.ndarray, int]]:
        """(position, pasted label map, detections kept) per train image of `block`."""
        for i in track(block, "filter: initial model on train"):
            image = ds.load_image(ds.samples[int(i)])
            with torch.inference_mode():
                dets = predict_instances(model, image, score_floor=cfg.score_floor, device=device)
            label = filter_and_paste(dets, image.shape[0], image.shape[1], score_threshold=cfg.score_threshold,
                                     mask_threshold=cfg.mask_threshold, dtype=np.uint16, min_keep=cfg.min_keep)
            yield int(i), label, len(select_confident(dets, cfg.score_threshold, cfg.min_keep))

    records = dist.sharded(train, compute, out)
    if records is None:  # another rank writes the artifact
        return
    kept = []
    with open_artifact(masks_path, "useg.masks", index.fingerprint) as masks, open_artifact(
        clusters_path, "useg.clusters", index.fingerprint
    ) as clusters, write_artifact(out, SCHEMA, prov) as f:
        mpos = masks["image_index"][()]
        mscore = masks["score"][()]
        mlabel = clusters["label"][()]
        mreader = RaggedReader(masks, "masks")
        f.attrs["num_clusters"] = k
        f.attrs["scene_centric"] = bool(state["scene_centric"])
        string_dataset(f, "ids", [ds.samples[int(i)].id for i in train])
        f.create_dataset("positions", data=train, track_times=False)
        w = RaggedWriter(f, "labels", np.uint16, 2)
        for i, label, n_kept in records:
            kept.append(n_kept)
            w.append(label)
            if has_gt:
                gt = ds.load_mask(ds.samples[i])
                sel = np.flatnonzero(mpos == i)
                before = paste_cluster_masks([mreader[j] for j in sel], mlabel[sel], mscore[sel], label.shape)
                conf_before += confusion_matrix(before.astype(np.int64), gt, k + 1, c)
                conf_after += confusion_matrix(label.astype(np.int64), gt, k + 1, c)
        w.close()
    empty = sum(1 for n in kept if n == 0)
    metrics = {"images": int(len(train)), "detections_kept_mean": round(float(np.mean(kept)), 4),
               "images_without_detection": empty}
    if has_gt:
        metrics["diagnostic_train_gt"] = {"before_filter": diagnostic(conf_before), "after_filter": diagnostic(conf_after)}
    with staged_folder(metrics_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
    console = Console(stderr=True)
    console.print(f"filter: {json.dumps(metrics)}")
    warning = empty_images_warning(empty, len(kept), cfg.score_floor)
    if warning:
        console.print(warning, style="yellow", markup=False)
