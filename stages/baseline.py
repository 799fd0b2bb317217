"""Stage `baseline`: K-means on patch tokens (and on per-pixel RGB+xy), label maps for the eval split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console

from pipeline import runtime
from pipeline.artifacts import Provenance, RaggedWriter, open_artifact, string_dataset, write_artifact
from pipeline.baseline import fit_kmeans, l2_normalize, sample_rows, score_map_labels
from pipeline.config import Params
from pipeline.index import ImageIndex, read_index
from pipeline.progress import track

SCHEMA = "useg.predictions"


def num_clusters(params: Params, index: ImageIndex) -> int:
    k = params.baseline.num_clusters or index.dataset.num_classes
    if k < 2:
        from pipeline.errors import ParamsError

        raise ParamsError("params key 'baseline.num_clusters': 0 (= number of classes) needs a labelled dataset; set it >= 2")
    return k


def fit_patch_kmeans(params: Params, index: ImageIndex, feats, k: int) -> np.ndarray:
    cfg = params.baseline
    train = index.positions(params.base.train_split)
    tokens = feats["patch_tokens"]
    p = tokens.shape[1]
    rows = sample_rows(len(train), p, cfg.max_fit_tokens, params.base.seed)
    x = np.empty((rows.size, tokens.shape[2]), dtype=np.float32)
    item = rows // p
    for j in track(np.unique(item), "baseline: reading train tokens"):
        sel = item == j
        x[sel] = tokens[int(train[j])][rows[sel] % p]
    return fit_kmeans(l2_normalize(x), k, cfg.kmeans_iters, params.base.seed, cfg.kmeans_redo)


def run(params: Params, index_path: Path, features_path: Path, out: Path) -> None:
    runtime.setup(params.base)
    cfg = params.baseline
    index = read_index(index_path)
    k = num_clusters(params, index)
    eval_pos = index.positions(params.base.eval_split)
    samples = [index.dataset.samples[i] for i in eval_pos]
    prov = Provenance(
        "baseline", params.section_json("baseline"), index.fingerprint,
        {"index": str(index_path), "features": str(features_path)},
    )
    feats = open_artifact(features_path, "useg.features", index.fingerprint) if "patch_kmeans" in cfg.methods else None
    with write_artifact(out, SCHEMA, prov) as f:
        string_dataset(f, "ids", [s.id for s in samples])
        f.create_dataset("positions", data=eval_pos, track_times=False)
        f.attrs["methods"] = ",".join(cfg.methods)
        for method in cfg.methods:
            g = f.create_group(method)
            g.attrs["num_clusters"] = k
            w = RaggedWriter(g, "labels", np.uint16, 2)
            if method == "patch_kmeans":
                centroids = fit_patch_kmeans(params, index, feats, k)
                g.create_dataset("centroids", data=centroids, track_times=False)
                grid = tuple(int(v) for v in feats.attrs["grid"])
                for i in track(eval_pos, "baseline: patch K-means labels"):
                    tok = feats["patch_tokens"][int(i)].astype(np.float32)
                    w.append(score_map_labels(tok, centroids, grid, (index.heights[i], index.widths[i])).astype(np.uint16))
            else:
                from pipeline.baseline_rgbxy import rgbxy_kmeans_predict

                images = [index.dataset.load_image(s) for s in track(samples, "baseline: loading images")]
                for lab in rgbxy_kmeans_predict(
                    images, k, params.base.seed, xy_weight=cfg.rgbxy_xy_weight, max_pixels=cfg.rgbxy_max_pixels
                ):
                    w.append(lab.astype(np.uint16))
            w.close()
    if feats is not None:
        feats.close()
    Console(stderr=True).print(f"baseline: {', '.join(cfg.methods)} with K={k} on {len(samples)} {params.base.eval_split} images")
