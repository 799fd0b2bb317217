"""Stage `mine`: object-mask proposals for the train split -> `masks.h5`.

Per mask: its pixels at original resolution (ragged), its token-grid mask, score, bounding box
(x0, y0, x1, y1; x1, y1 exclusive) and image position. Images without a proposal (saliency
area under `mine.min_area`) are counted, never silently lost.
"""

from __future__ import annotations

import array
from pathlib import Path
from typing import Iterator

import numpy as np
from rich.console import Console
from threadpoolctl import threadpool_limits

from pipeline import dist, runtime
from pipeline.artifacts import Provenance, RaggedWriter, RowSpool, create_dataset, open_artifact, write_artifact
from pipeline.config import Params
from pipeline.errors import ParamsError
from pipeline.index import read_index
from pipeline.mining import (
    AttentionMiningConfig,
    attention_mask,
    cls_attention_map,
    mask_box,
    mask_score,
    postprocess_saliency,
    prior_saliency,
    spectral_masks,
    upsample_mask,
)
from pipeline.progress import track

SCHEMA = "useg.masks"


def grid_mask_from_pixels(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Token-grid mask: a patch is in when at least half its area is (area resampling)."""
    import cv2

    small = cv2.resize(mask.astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
    out = small >= 0.5
    if not out.any():
        out.flat[int(np.argmax(small))] = True
    return out


class Miner:
    """Yields (grid mask, full mask, score) per proposal for one image."""

    def __init__(self, params: Params, feats, heads: int | None, weights_dir: Path, section: str = "mine"):
        self.cfg = getattr(params, section)
        self.feats = feats
        self.grid = tuple(int(v) for v in feats.attrs["grid"])
        self.heads = heads
        self.seed = params.base.seed
        m = self.cfg
        if m.method == "attention":
            if heads is None or "keys" not in feats:
                raise ParamsError(f"params key '{section}.method': attention needs a ViT backbone with features.store_keys: true")
            if m.num_heads_avg > heads:
                raise ParamsError(f"params key '{section}.num_heads_avg': {m.num_heads_avg} > the backbone's {heads} heads")
            self.att_cfg = AttentionMiningConfig(num_heads_avg=m.num_heads_avg, attn_mass=m.attn_mass, topk=m.topk, center_keys=m.center_keys)
        self.focus = None
        if m.method == "saliency" and m.saliency_source == "focus":
            from pipeline.focus import FocusSaliency

            self.focus = FocusSaliency(weights_dir / "vit_s_focus.onnx", threads=max(1, params.base.threads))

    def __call__(self, pos: int, image_loader, hw: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray, float]]:
        m = self.cfg
        if m.method == "attention":
            q = self.feats["cls_query"][pos].astype(np.float32)
            k = self.feats["keys"][pos].astype(np.float32)
            g = attention_mask(q, k, self.grid, self.heads, self.att_cfg)
            score_map = cls_attention_map(self.feats["cls_attn"][pos].astype(np.float32), self.grid, m.num_heads_avg)
            return [(g, upsample_mask(g, hw), mask_score(g, score_map))]
        if m.method == "spectral":
            tokens = self.feats["patch_tokens"][pos].astype(np.float32)
            out = []
            for g in spectral_masks(tokens, self.grid, m.masks_per_image, min_area=m.spectral_min_area, seed=self.seed):
                out.append((g, upsample_mask(g, hw), float(g.mean())))
            return out
        image = image_loader()
        sal = self.focus(image) if self.focus is not None else prior_saliency(image)
        full = postprocess_saliency(sal, m.saliency_threshold, m.min_component, m.min_area)
        if full is None:
            return []
        return [(grid_mask_from_pixels(full, self.grid), full, mask_score(full, sal))]


def run(params: Params, index_path: Path, features_path: Path, weights_dir: Path, out: Path, section: str = "mine") -> None:
    """Mine the train split with the mining params of `section` (`mine`, or `contrast_mine` for MaskContrast)."""
    runtime.setup(params.base)
    index = read_index(index_path)
    train = index.positions(params.base.train_split)
    feats = open_artifact(features_path, "useg.features", index.fingerprint)
    heads = int(feats["cls_attn"].shape[1]) if "cls_attn" in feats else None
    miner = Miner(params, feats, heads, weights_dir, section)
    method = miner.cfg.method
    grid = miner.grid
    prov = Provenance(
        section, params.section_json(section), index.fingerprint,
        {"index": str(index_path), "features": str(features_path)},
    )

    def compute(block) -> Iterator[tuple[int, list]]:
        """(position, proposals) per image of `block`."""
        with threadpool_limits(max(1, params.base.threads)):
            for pos in track(block, f"mine ({method})"):
                pos = int(pos)
                s = index.dataset.samples[pos]
                hw = (int(index.heights[pos]), int(index.widths[pos]))
                yield pos, miner(pos, lambda: index.dataset.load_image(s), hw)

    records = dist.sharded(train, compute, out)
    if records is None:  # another rank writes the artifact
        feats.close()
        return
    # Per-mask records grow with the dataset, so they stay compact: int64/float64 arrays (8 bytes
    # a value, not a Python object), grid masks spooled to a temporary file, full masks
    # appended to masks.h5 as they come. Only the first dropped ids are kept, for the message.
    image_pos, scores, boxes = array.array("q"), array.array("d"), array.array("q")
    dropped, n_dropped = [], 0
    with write_artifact(out, SCHEMA, prov) as f:
        f.attrs["method"] = method
        f.attrs["grid"] = np.asarray(grid, dtype=np.int64)
        f.attrs["split"] = params.base.train_split
        f.attrs["scene_centric"] = method == "spectral"
        w = RaggedWriter(f, "masks", np.uint8, 2)
        grids = RowSpool(grid, np.uint8, out.parent)
        for pos, found in records:
            s = index.dataset.samples[pos]
            if not found:
                n_dropped += 1
                if len(dropped) < 5:
                    dropped.append(s.id)
            for g, full, score in found:
                w.append(full.astype(np.uint8))
                image_pos.append(pos)
                scores.append(score)
                boxes.extend(mask_box(full))
                grids.append(g)
        w.close()
        n = len(image_pos)
        f.create_dataset("image_index", data=np.asarray(image_pos, dtype=np.int64), track_times=False)
        f.create_dataset("score", data=np.asarray(scores, dtype=np.float32), track_times=False)
        f.create_dataset("box", data=np.asarray(boxes, dtype=np.int32).reshape(n, 4), track_times=False)
        # `gd` stays open until the file closes, as the datasets above: closing it here would
        # flush its chunks before those of masks/data and change the file's bytes.
        gd = create_dataset(f, "grid_masks", (n, *grid), np.uint8)
        grids.write_to(gd)
        f.attrs["dropped_images"] = n_dropped
    feats.close()
    Console(stderr=True).print(
        f"mine: {n} masks from {len(train)} {params.base.train_split} images "
        f"({n_dropped} images without a proposal{': ' + ', '.join(dropped) if dropped else ''})"
    )
