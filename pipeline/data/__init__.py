"""Datasets: the `Dataset` interface, the registry of loaders and the synthetic generator."""

from pipeline.data.base import IGNORE, Dataset, Sample, read_gray, read_rgb
from pipeline.data.registry import DATASETS, dataset_options, get_dataset, register_dataset
from pipeline.data.synthetic import generate_synthetic

__all__ = [
    "DATASETS",
    "IGNORE",
    "Dataset",
    "Sample",
    "dataset_options",
    "generate_synthetic",
    "get_dataset",
    "read_gray",
    "read_rgb",
    "register_dataset",
]
