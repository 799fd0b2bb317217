"""Stage `prepare`: index and validate the dataset named in `base` (every file decoded once)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from pipeline.config import Params
from pipeline.data import get_dataset
from pipeline.index import write_index


def run(params: Params, out: Path) -> None:
    b = params.base
    ds = get_dataset(b.dataset, b.data_root, **b.dataset_options)
    for split in {b.train_split, b.eval_split}:
        ds.split(split)  # fails early, naming the split, if it is absent
    fingerprint = ds.validate()
    write_index(out, ds, b.data_root, dict(b.dataset_options), fingerprint, params.section_json("base"))
    Console(stderr=True).print(
        f"prepare: {b.dataset} at {b.data_root}: {len(ds.samples)} images, {ds.num_classes} classes, fingerprint {fingerprint[:12]}"
    )
