"""User command `segment`: label image files with a trained segmenter, outside the pipeline.

Reads image files (a folder gives its image files, sorted) and a segmenter checkpoint; writes
per image OUT/<name>.png, the class id of every pixel (8-bit grey; 16-bit beyond 255 classes),
and OUT/<name>_overlay.png, the classes' colours blended over the image. <name> is the file's
stem, disambiguated only where two inputs would clash (see `output_names`). A file that cannot
be decoded is skipped and reported at the end; the others are still written.

Images are decoded one batch ahead in a background thread, right before their batch, so a
corrupt file fails alone. Consecutive images of one network input size share a forward pass.
"""

from __future__ import annotations

import itertools
import os
import pickle
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline import runtime
from pipeline.config import Params
from pipeline.crf import crf_labels
from pipeline.data.base import read_rgb
from pipeline.errors import DataError, UsegError
from pipeline.progress import track
from pipeline.segmenter import predict_segmenter_batch
from pipeline.viz import write_png, overlay

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OVERLAY_SUFFIX = "_overlay"
MAX_UINT8_CLASSES = 255  # more classes are written as 16-bit PNGs


@dataclass(frozen=True)
class Method:
    """A segmenter `useg segment` can run.

    Attributes:
        checkpoint: Default checkpoint, the one the pipeline trains.
        load: `load(path)` -> (model in eval mode, state with "num_classes"); the model maps
            ImageNet-normalised (B, 3, H, W) images to (B, C, H, W) logits.
    """

    checkpoint: Path
    load: Callable[[Path], tuple[torch.nn.Module, dict]]


def _load_maskdistill(path: Path) -> tuple[torch.nn.Module, dict]:
    from stages.segment import is_token_head, load_segmenter

    try:
        model, state = load_segmenter(path, None)
    except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise UsegError(f"{path}: not a segmenter checkpoint of `useg train-segmenter` ({e!r:.200})") from None
    if is_token_head(state):
        raise UsegError(f"{path}: a token head (segment.model: token_head) labels the cached features of its "
                        "dataset only (`useg predict`); `useg segment` needs a deeplabv3 segmenter")
    return model, state


def _load_transfgu(path: Path) -> tuple[torch.nn.Module, dict]:
    from stages.transfgu import load_transfgu_segmenter

    try:
        return load_transfgu_segmenter(path)
    except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise UsegError(f"{path}: not a decoder checkpoint of `useg transfgu` ({e!r:.200})") from None


# MaskContrast is not here: its segmentation is K-means over the eval split's prototypes
# (`contrast_eval`), not a network that labels one image on its own.
METHODS: dict[str, Method] = {
    "maskdistill": Method(Path("models/segmenter.pt"), _load_maskdistill),
    "transfgu": Method(Path("models/transfgu.pt"), _load_transfgu),
}


@dataclass(frozen=True)
class Failure:
    """An input that could not be segmented, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class SegmentReport:
    """What a `run` did: images written, inputs that failed, seconds spent on the images."""

    written: int
    failures: list[Failure]
    seconds: float


def collect_images(inputs: Sequence[Path], recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """The image files named by `inputs`, in order, each once.

    A file is taken as is, whatever its extension. A folder gives its files with an image
    extension (`IMAGE_EXTENSIONS`, any letter case), sorted, skipping hidden files and
    anything under `exclude` (the output folder); its subfolders only with `recursive`.

    Raises:
        UsegError: An input does not exist, or no image was found at all.
    """
    excluded = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        if item.is_dir():
            candidates = item.rglob("*") if recursive else item.iterdir()
            files = sorted(p for p in candidates if _is_image_file(p, item, excluded))
        elif item.exists():
            files = [item]
        else:
            raise UsegError(f"{item}: no such file or folder")
        for path in files:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(path)
    if not found:
        where = ", ".join(map(str, inputs))
        raise UsegError(f"no images found in {where} (looked for {' '.join(IMAGE_EXTENSIONS)}"
                        f"{', recursively' if recursive else '; --recursive for subfolders'})")
    return found


def _is_image_file(path: Path, root: Path, excluded: Path | None) -> bool:
    if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
        return False
    if any(part.startswith(".") for part in path.relative_to(root).parts):
        return False
    return excluded is None or not path.resolve().is_relative_to(excluded)


def output_names(paths: Sequence[Path]) -> list[str]:
    """A unique output name per image: its stem, disambiguated only where names would clash.

    Names are compared ignoring case (as on case-insensitive file systems), and an image's
    label map `<name>.png` must not meet another's overlay `<name>_overlay.png`. Each round,
    clashing images in one folder with one stem take their extension (`a_png`, `a_jpg`); the
    other clashing images take one more parent folder name (`cats_a`, then `train_cats_a`).

    Raises:
        UsegError: Two paths that no prefix or suffix can tell apart.
    """
    absolute = [Path(os.path.abspath(p)) for p in paths]
    depth = [0] * len(paths)
    with_ext = [False] * len(paths)
    while True:
        names = [_candidate_name(p, d, e) for p, d, e in zip(absolute, depth, with_ext)]
        clashing = _clashing(names)
        if not clashing:
            return names
        for i in clashing:
            folder_twin = any(j != i and absolute[j].parent == absolute[i].parent
                              and absolute[j].stem.casefold() == absolute[i].stem.casefold() for j in clashing)
            if folder_twin and not with_ext[i]:
                with_ext[i] = True
            elif depth[i] < len(absolute[i].parent.parts) - 1:
                depth[i] += 1
            elif not with_ext[i]:
                with_ext[i] = True
            else:
                other = next(paths[j] for j in clashing if j != i and _clash(names[i], names[j]))
                raise UsegError(f"{paths[i]} and {other}: no output names tell them apart (rename one, "
                                f"or segment them in separate runs)")


def _candidate_name(path: Path, depth: int, with_ext: bool) -> str:
    folders = path.parent.parts[1:]  # without the root
    parts = [*folders[len(folders) - depth:], path.stem] if depth else [path.stem]
    if with_ext and path.suffix:
        parts.append(path.suffix[1:])
    return "_".join(parts)


def _clash(a: str, b: str) -> bool:
    a, b, suffix = a.casefold(), b.casefold(), OVERLAY_SUFFIX.casefold()
    return a == b or a == b + suffix or b == a + suffix


def _clashing(names: list[str]) -> list[int]:
    """Images whose label map name is taken by another image's label map or overlay."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name.casefold()] = counts.get(name.casefold(), 0) + 1
    suffix = OVERLAY_SUFFIX.casefold()
    out = []
    for i, name in enumerate(names):
        key = name.casefold()
        if counts[key] > 1 or (key.endswith(suffix) and key[: -len(suffix)] in counts):
            out.append(i)
    return out


def network_size(shape: tuple[int, int], size: tuple[int, int] | None, max_side: int | None) -> tuple[int, int]:
    """The (h, w) an image of `shape` is resized to for the network.

    `size` if given; else the image shrunk, keeping its aspect ratio, until its longer side
    is at most `max_side`; else the image's own size.
    """
    if size is not None:
        return size
    h, w = shape
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))
    return h, w


def read_image(path: Path) -> np.ndarray | str:
    """The image as RGB uint8 (H, W, 3), or the reason it cannot be read."""
    try:
        return read_rgb(path)
    except DataError as e:
        return str(e).removeprefix(f"{path}: ")
    except (Image.DecompressionBombError, OSError, ValueError) as e:
        return f"cannot decode image ({e})"


def _read_chunk(paths: Sequence[Path]) -> list[np.ndarray | str]:
    return [read_image(p) for p in paths]


def _segment(
    model: torch.nn.Module,
    paths: Sequence[Path],
    batch_size: int,
    size: tuple[int, int] | None,
    max_side: int | None,
    device: torch.device,
) -> Iterator[tuple[np.ndarray | str, np.ndarray | None]]:
    """Per path, in order: (image, class probabilities (C, H, W)) or (failure reason, None)."""
    chunks = [paths[s : s + batch_size] for s in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_read_chunk, chunks[0])
        for k in range(len(chunks)):
            loaded = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(_read_chunk, chunks[k + 1])
            images = [im for im in loaded if not isinstance(im, str)]
            probs = _predict_runs(model, images, [network_size(im.shape[:2], size, max_side) for im in images],
                                  batch_size, device)
            for im in loaded:
                yield (im, None) if isinstance(im, str) else (im, next(probs))


def _predict_runs(
    model: torch.nn.Module,
    images: list[np.ndarray],
    sizes: list[tuple[int, int]],
    batch_size: int,
    device: torch.device,
) -> Iterator[np.ndarray]:
    """Probabilities at each image's size; consecutive images of one network size share a batch."""
    start = 0
    for net_size, run in itertools.groupby(sizes):
        n = len(list(run))
        yield from predict_segmenter_batch(model, images[start : start + n], net_size, batch_size, device)
        start += n


def write_outputs(image: np.ndarray, labels: np.ndarray, out: Path, name: str, num_classes: int) -> None:
    """Write OUT/<name>.png (label map) and OUT/<name>_overlay.png, each atomically."""
    dtype = np.uint8 if num_classes <= MAX_UINT8_CLASSES else np.uint16
    label_map = labels.astype(dtype)
    write_png(Image.fromarray(label_map), out / f"{name}.png")
    write_png(Image.fromarray(overlay(image, label_map)), out / f"{name}{OVERLAY_SUFFIX}.png")


def _check_outputs(paths: Sequence[Path], names: Sequence[str], out: Path) -> None:
    """Refuse to overwrite an input with an output (e.g. OUT is an input folder)."""
    inputs = {p.resolve(): p for p in paths}
    for name in names:
        for target in (out / f"{name}.png", out / f"{name}{OVERLAY_SUFFIX}.png"):
            if target.resolve() in inputs:
                raise UsegError(f"{target}: would overwrite the input {inputs[target.resolve()]} (choose another --out)")


def run(
    params: Params,
    inputs: Sequence[Path],
    out: Path,
    method: str = "maskdistill",
    model_path: Path | None = None,
    recursive: bool = False,
    batch_size: int = 8,
    size: tuple[int, int] | None = None,
    max_side: int | None = None,
    crf: bool = False,
) -> SegmentReport:
    """Segment image files; write label maps and overlays to `out`; report what failed.

    Args:
        params: `base` (device, threads, seed) and `crf` settings.
        inputs: Image files and folders (see `collect_images`).
        out: Output folder, created if needed; files of the same names are replaced.
        method: A key of `METHODS`.
        model_path: Checkpoint; None = the method's default.
        recursive: Take images in subfolders of folder inputs too.
        batch_size: Images per forward pass.
        size: Network input (h, w) for every image; None = see `max_side`.
        max_side: Shrink images whose longer side exceeds it; None (and no `size`) = original size.
        crf: Refine the probabilities with a dense CRF before the argmax.

    Returns:
        The count written, the inputs that could not be read (with the reason) and the time.

    Raises:
        UsegError: Before any image is read: an unknown method, bad sizes, a missing input
            or checkpoint, no images, unresolvable or input-overwriting output names.
    """
    if method not in METHODS:
        raise UsegError(f"--method {method!r}: unknown (available: {', '.join(METHODS)})")
    if size is not None and max_side is not None:
        raise UsegError("--size and --max-side: give one or the other")
    if size is not None and min(size) < 1 or max_side is not None and max_side < 1 or batch_size < 1:
        raise UsegError("--size, --max-side and --batch-size must be positive")
    model_path = model_path if model_path is not None else METHODS[method].checkpoint
    if not model_path.is_file():
        raise UsegError(f"{model_path}: {method} checkpoint not found (train it with `dvc repro`, or pass --model)")
    if out.exists() and not out.is_dir():
        raise UsegError(f"--out {out}: exists and is not a folder")
    paths = collect_images(inputs, recursive, exclude=out)
    names = output_names(paths)
    _check_outputs(paths, names, out)

    device = runtime.setup(params.base)
    model, state = METHODS[method].load(model_path)
    num_classes = int(state["num_classes"])
    if crf and num_classes > MAX_UINT8_CLASSES:
        raise UsegError(f"--crf: the dense CRF handles at most {MAX_UINT8_CLASSES} classes, the model has {num_classes}")
    model.to(device).eval()
    out.mkdir(parents=True, exist_ok=True)

    failures: list[Failure] = []
    start = time.perf_counter()
    with torch.inference_mode():
        results = _segment(model, paths, batch_size, size, max_side, device)
        for i, (image, probs) in enumerate(track(results, "segment", total=len(paths))):
            if probs is None:
                failures.append(Failure(paths[i], image))
                continue
            labels = crf_labels(image, probs, params.crf) if crf else probs.argmax(0)
            write_outputs(image, labels, out, names[i], num_classes)
    seconds = time.perf_counter() - start
    report = SegmentReport(len(paths) - len(failures), failures, seconds)
    _print_report(report, out)
    return report


def _print_report(report: SegmentReport, out: Path) -> None:
    """Summary on stderr, then one `path: reason` line per failed input."""
    rate = report.written / report.seconds if report.seconds > 0 else 0.0
    print(f"segment: {report.written} images -> {out} (label maps + overlays) in {report.seconds:.1f} s, "
          f"{rate:.2f} images/s", file=sys.stderr)
    if report.failures:
        n = len(report.failures)
        print(f"segment: {n} input{'s' if n > 1 else ''} could not be read:", file=sys.stderr)
        for f in report.failures:
            print(f"{f.path}: {f.reason}", file=sys.stderr)
