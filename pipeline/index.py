"""The image index written by `prepare`: ids, splits, sizes, file paths and the fingerprint.

Every later stage rebuilds its `Dataset` from the index (same registry name, root and
options) and stamps the index's dataset fingerprint into its own artifact, so an artifact
from another dataset is caught when it is read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.artifacts import Provenance, open_artifact, read_strings, string_dataset, write_artifact
from pipeline.data.base import Dataset, Sample
from pipeline.errors import DataError

SCHEMA = "useg.index"


@dataclass(frozen=True)
class ImageIndex:
    """What `prepare` recorded about a dataset."""

    dataset: Dataset
    fingerprint: str
    heights: np.ndarray
    widths: np.ndarray

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.dataset.samples]

    def positions(self, split: str) -> np.ndarray:
        """Positions (into the index order) of the samples of a split."""
        if split == "all":
            return np.arange(len(self.dataset.samples))
        pos = np.asarray([i for i, s in enumerate(self.dataset.samples) if s.split == split], dtype=np.int64)
        if pos.size == 0:
            raise DataError(f"dataset {self.dataset.name!r} has no images in split {split!r}")
        return pos


def image_sizes(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Heights and widths from the image headers (cheap: no decoding)."""
    from PIL import Image

    hs, ws = [], []
    for s in dataset.samples:
        with Image.open(s.image) as im:
            w, h = im.size
        hs.append(h)
        ws.append(w)
    return np.asarray(hs, dtype=np.int32), np.asarray(ws, dtype=np.int32)


def write_index(path: Path, dataset: Dataset, root: str, options: dict, fingerprint: str, params_json: str) -> None:
    heights, widths = image_sizes(dataset)
    prov = Provenance("prepare", params_json, fingerprint, {})
    with write_artifact(path, SCHEMA, prov) as f:
        f.attrs["dataset"] = dataset.name
        f.attrs["root"] = str(root)
        f.attrs["options"] = json.dumps(options, sort_keys=True)
        f.attrs["class_names"] = json.dumps(dataset.class_names)
        f.attrs["has_labels"] = bool(dataset.has_labels)
        string_dataset(f, "ids", [s.id for s in dataset.samples])
        string_dataset(f, "splits", [s.split for s in dataset.samples])
        f.create_dataset("heights", data=heights, track_times=False)
        f.create_dataset("widths", data=widths, track_times=False)


def read_index(path: str | Path) -> ImageIndex:
    """Rebuild the dataset recorded in an index artifact."""
    from pipeline.data import get_dataset

    with open_artifact(path, SCHEMA) as f:
        name = str(f.attrs["dataset"])
        root = str(f.attrs["root"])
        options = json.loads(f.attrs["options"])
        ids = read_strings(f, "ids")
        splits = read_strings(f, "splits")
        fingerprint = str(f.attrs["dataset_fingerprint"])
        heights = f["heights"][()]
        widths = f["widths"][()]
    ds = get_dataset(name, root, **options)
    by_key = {(s.id, s.split): s for s in ds.samples}
    samples: list[Sample] = []
    for i, sp in zip(ids, splits):
        s = by_key.get((i, sp))
        if s is None:
            raise DataError(f"{path}: image {i!r} ({sp}) is no longer in {root}: re-run prepare")
        samples.append(s)
    ds = dataclasses.replace(ds, samples=samples)
    return ImageIndex(ds, fingerprint, heights, widths)
