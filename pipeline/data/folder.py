"""A plain folder of images with no labels: a user's own photos.

Every image under `root` (recursively; .jpg .jpeg .png .bmp .webp in any letter case;
hidden files and folders skipped) is one sample of split "train", sorted by relative path.
The id is the relative path without its extension, with "/" separators.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.base import Dataset, Sample
from pipeline.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_folder(root: Path) -> Dataset:
    """Every image under `root`, unlabelled, all in split "train" (also reachable as "all")."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    files = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"{root}: no images found (looked for {' '.join(IMAGE_EXTENSIONS)}, recursively)")
    samples: list[Sample] = []
    seen: dict[str, Path] = {}
    for rel, path in files:
        sid = rel[: -len(path.suffix)]
        if sid in seen:
            raise DataError(f"{path}: same id {sid!r} as {seen[sid]} (ids are paths without extension)")
        seen[sid] = path
        samples.append(Sample(sid, path, None, "train"))
    return Dataset("folder", samples, [])
