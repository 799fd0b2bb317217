"""Stage `synth`: generate the embedded synthetic dataset from a seed."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params


def run(params: Params, out: Path) -> None:
    """Write the dataset to OUT; it is built in a temporary folder and renamed into place."""
    from pipeline.data.synthetic import generate_synthetic

    cfg = params.synth
    generate_synthetic(out, seed=params.base.seed, num_images=cfg.num_images, size=cfg.image_size, val_fraction=cfg.val_fraction)
