"""Datasets by name: `get_dataset("camvid", root)`, the name coming from params.yaml.

A loader is a function `(root: Path, **options) -> Dataset`. Its keyword arguments are the
options a dataset accepts (e.g. `classes=21` for MSRC); `get_dataset` rejects any other
option by name before calling it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from pipeline.data.base import Dataset
from pipeline.data.camvid import load_camvid
from pipeline.data.cityscapes import load_cityscapes27
from pipeline.data.cocostuff import load_cocostuff27
from pipeline.data.folder import load_folder
from pipeline.data.msrc import load_msrc
from pipeline.data.synthetic import load_synthetic
from pipeline.data.voc import load_voc
from pipeline.data.weizmann import load_weizmann
from pipeline.errors import DataError, ParamsError

DATASETS: dict[str, Callable[..., Dataset]] = {
    "synthetic": load_synthetic,
    "camvid": load_camvid,
    "msrc_v2": load_msrc,
    "weizmann_horse": load_weizmann,
    "voc2012": load_voc,
    "folder": load_folder,
    "cocostuff27": load_cocostuff27,
    "cityscapes27": load_cityscapes27,
}


def register_dataset(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator adding a loader `(root: Path, **options) -> Dataset` to `DATASETS`."""

    def add(loader: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = loader
        return loader

    return add


def dataset_options(name: str) -> dict[str, object]:
    """The options a registered dataset takes, with their defaults."""
    params = inspect.signature(DATASETS[name]).parameters
    return {k: p.default for k, p in list(params.items())[1:] if p.kind is not p.VAR_KEYWORD}


def get_dataset(name: str, root: str | Path, **options) -> Dataset:
    """Load the dataset `name` from the folder `root`.

    Raises:
        DataError: for an unknown name (the message lists the known ones), a missing root
            folder, or a missing or malformed file of the layout.
        ParamsError: for an option the dataset does not take, or a bad option value.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (known: {', '.join(sorted(DATASETS))})")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (dataset {name!r})")
    allowed = dataset_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = ", ".join(f"{k}={v!r}" for k, v in allowed.items()) or "none"
        raise ParamsError(f"dataset {name!r} has no option {unknown[0]!r} (options: {takes})")
    return DATASETS[name](root, **options)
