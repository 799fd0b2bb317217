"""Stage `synth`: generate the embedded synthetic dataset from a seed."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.config import Params


def run(params: Params, out: Path) -> None:
    from pipeline.data.synthetic import generate_synthetic

    cfg = params.synth
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    generate_synthetic(tmp, seed=params.base.seed, num_images=cfg.num_images, size=cfg.image_size, val_fraction=cfg.val_fraction)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
