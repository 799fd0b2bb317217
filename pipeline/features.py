"""Backbone features per image: preprocessing, batching and writing to `features.h5`.

The backbone runs once over every image of the dataset at a fixed input size (a multiple of
the patch size). Stored in float16 (uncompressed chunks): last-layer patch tokens (N, P, D), the CLS token (N, D),
and from the last block the CLS-to-patch attention per head (N, heads, P), the CLS query
(N, D) and the patch keys (N, P, D) that mask mining needs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.artifacts import create_dataset
from pipeline.data.base import Dataset, Sample

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def preprocess(image: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> ImageNet-normalised float (3, h, w) at `size` = (h, w)."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    if tuple(x.shape[1:]) != tuple(size):
        x = F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def _load_batch(dataset: Dataset, chunk: Sequence[Sample], size: Sequence[int]) -> torch.Tensor:
    return torch.stack([preprocess(dataset.load_image(s), size) for s in chunk])


def iter_batches(
    dataset: Dataset, samples: Sequence[Sample], size: Sequence[int], batch_size: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start position, batch tensor) over `samples` in order.

    The next batch is decoded in a background thread while the caller runs the model
    (PIL decoding and torch resizing release the GIL).
    """
    starts = list(range(0, len(samples), batch_size))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_batch, dataset, samples[0:batch_size], size) if starts else None
        for k, start in enumerate(starts):
            batch = pending.result()
            if k + 1 < len(starts):
                nxt = starts[k + 1]
                pending = pool.submit(_load_batch, dataset, samples[nxt : nxt + batch_size], size)
            yield start, batch


@dataclass(frozen=True)
class FeatureLayout:
    """Shapes of what a backbone produces at one input size."""

    grid: tuple[int, int]
    dim: int
    heads: int | None
    has_cls: bool


def probe_layout(backbone: torch.nn.Module, size: Sequence[int]) -> FeatureLayout:
    """Run one dummy forward to learn the token grid and dimensions."""
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, *size))
    heads = None if out.cls_attn is None else int(out.cls_attn.shape[1])
    return FeatureLayout(tuple(out.grid), int(out.patch_tokens.shape[-1]), heads, out.cls is not None)


def create_feature_datasets(f: h5py.File, n: int, layout: FeatureLayout, store_keys: bool) -> dict[str, h5py.Dataset]:
    """Pre-allocate the float16 datasets of `features.h5`.

    Chunked but not compressed: float16 tokens do not compress (lzf saved 1% here and cost
    a fifth of the stage's overhead).
    """
    p = layout.grid[0] * layout.grid[1]
    d = layout.dim
    out = {"patch_tokens": create_dataset(f, "patch_tokens", (n, p, d), np.float16, None)}
    if layout.has_cls:
        out["cls"] = create_dataset(f, "cls", (n, d), np.float16, None)
    if layout.heads:
        out["cls_attn"] = create_dataset(f, "cls_attn", (n, layout.heads, p), np.float16, None)
        out["cls_query"] = create_dataset(f, "cls_query", (n, d), np.float16, None)
        if store_keys:
            out["keys"] = create_dataset(f, "keys", (n, p, d), np.float16, None)
    return out


def to_f16(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float16)
