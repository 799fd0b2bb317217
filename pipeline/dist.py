"""Several processes per stage: torchrun DDP for training, sharded inference.

With `base.nproc` > 1 a stage command relaunches itself under `torch.distributed.run`
(`launch`); when it already runs under torchrun (WORLD_SIZE set, e.g. a multi-node
`torchrun --nnodes ...` started by the user) it does not. `runtime.setup` then joins the
process group: gloo on CPU, NCCL on CUDA (one GPU per local rank).

- Training stages split every global batch of `batch_size` items into equal contiguous
  parts, one per rank, and wrap the model in DistributedDataParallel, which averages the
  gradients: the step is the one-process step on the same batch up to batch-dependent
  terms (batch norm statistics per rank unless synced, OHEM's hardest-pixel share per
  rank). Batch norm is synced (SyncBatchNorm) on CUDA; torch implements it for GPU
  modules only, so CPU ranks keep per-rank statistics. Random augmentations are drawn per
  item from (seed, iteration, place in the batch), so a rank draws the same crop for an
  item as one process would.
- Inference stages (`sharded`) give each rank a contiguous block of the items, aligned to
  the batch size so every batch is the one a single process would run; each rank streams
  its records to a shard file next to the output, and rank 0 replays them in order
  through the same writer, so the artifact is byte-identical to the one-process artifact
  when each rank uses the one-process run's thread count (`base.threads`): CPU kernels may
  add up in another order with another number of threads.
- Rank 0 alone writes artifacts, checkpoints, metrics and DVCLive logs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from pipeline.errors import ParamsError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of the stage."""

    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The rank and world size torchrun gave this process (0 of 1 without torchrun)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    return world().main


def launch(nproc: int, argv: Sequence[str]) -> int | None:
    """Relaunch this command as `nproc` local ranks under torchrun; None if no relaunch is due.

    Returns the exit code of the torchrun group when it ran. Under torchrun already
    (WORLD_SIZE set) or with nproc 1, nothing happens: the caller runs the stage itself.
    """
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "stages.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torch threads are set from base.threads per rank
    env.setdefault("LOGLEVEL", "WARNING")
    print(f"useg {argv[0]}: {nproc} ranks under torchrun (base.nproc)", file=sys.stderr, flush=True)
    return subprocess.run(cmd, env=env).returncode


def init(device: torch.device) -> torch.device:
    """Join the process group when running as one of several ranks; returns this rank's device."""
    w = world()
    if w.size <= 1:
        return device
    import torch.distributed as td

    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def check_divisible(batch_size: int, key: str, min_part: int = 1) -> None:
    """A global batch must split into equal parts of at least `min_part` items, one per rank."""
    w = world()
    if batch_size % w.size or batch_size // w.size < min_part:
        raise ParamsError(
            f"params key '{key}': {batch_size} does not split into {w.size} equal parts of >= {min_part} (base.nproc)"
        )


def item_rng(seed: int, iteration: int, slot: int):
    """The numpy generator of one item of a global batch: the same on whichever rank draws it."""
    import numpy as np

    return np.random.default_rng([seed, iteration, slot])


def part(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of a global batch (all of it with one process)."""
    w = world()
    if w.size == 1:
        return items
    n = len(items)
    return items[w.rank * n // w.size : (w.rank + 1) * n // w.size]


def part_offset(n: int) -> int:
    """Position in the global batch of this rank's first item."""
    w = world()
    return w.rank * n // w.size


def wrap(
    model: torch.nn.Module, device: torch.device, sync_bn: bool = True, find_unused_parameters: bool = False
) -> torch.nn.Module:
    """DistributedDataParallel around `model` with several ranks (SyncBatchNorm on CUDA); else `model`."""
    if world().size == 1:
        return model
    if sync_bn and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def mean(value: float) -> float:
    """The mean of a number over the ranks (the number itself with one process)."""
    return total(value) / world().size


def total(value: float) -> float:
    """The sum of a number over the ranks."""
    if world().size == 1:
        return value
    import torch.distributed as td

    t = torch.tensor([float(value)], dtype=torch.float64)
    td.all_reduce(t)
    return float(t.item())


def sum_gradients(params: Sequence[torch.Tensor]) -> None:
    """Add up the gradients of `params` over the ranks, in place (for models outside DDP)."""
    if world().size == 1:
        return
    import torch.distributed as td

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        td.all_reduce(p.grad)


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of `params` over the ranks, in place (what DDP does, for models outside it)."""
    if world().size == 1:
        return
    sum_gradients(params)
    for p in params:
        p.grad.div_(world().size)


def gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor concatenated along dim 0 in rank order (no gradient; `t` itself with one process)."""
    if world().size == 1:
        return t
    import torch.distributed as td

    parts = [torch.empty_like(t) for _ in range(world().size)]
    td.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts, 0)


def barrier() -> None:
    if world().size > 1:
        import torch.distributed as td

        td.barrier()


def block(n: int, align: int = 1) -> range:
    """This rank's contiguous block of `n` items, in whole multiples of `align` (the batch size)."""
    w = world()
    units = (n + align - 1) // align
    lo, hi = w.rank * units // w.size, (w.rank + 1) * units // w.size
    return range(min(n, lo * align), min(n, hi * align))


def _shard_path(out: Path, rank: int) -> Path:
    return out.with_name(f".{out.name}.rank{rank}.shard.tmp")


def sharded(
    items: Sequence[T], compute: Callable[[Sequence[T]], Iterable[R]], out: str | Path, align: int = 1
) -> Iterator[R] | None:
    """Records of `compute` over `items`, spread over the ranks; None on ranks other than 0.

    One process: `compute(items)`, streamed. Several: each rank runs `compute` on its block
    (`block`) and pickles the records one by one to a shard file beside `out`; after a
    barrier rank 0 gets an iterator over every rank's records in item order and the other
    ranks get None (they must not write `out`). `compute` must give the same records for a
    block as for the whole list (blocks are aligned to `align`, the batch size).
    """
    w = world()
    if w.size == 1:
        return iter(compute(items))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mine = _shard_path(out, w.rank)
    r = block(len(items), align)
    try:
        with open(mine, "wb") as fh:
            for rec in compute(items[r.start : r.stop]):
                pickle.dump(rec, fh, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:
        mine.unlink(missing_ok=True)
        raise
    barrier()
    if not w.main:
        return None
    return _replay([_shard_path(out, k) for k in range(w.size)])


def _replay(paths: list[Path]) -> Iterator:
    try:
        for p in paths:
            with open(p, "rb") as fh:
                while True:
                    try:
                        yield pickle.load(fh)
                    except EOFError:
                        break
    finally:
        for p in paths:
            with contextlib.suppress(OSError):
                p.unlink()


def finish() -> None:
    """Leave the process group at the end of a stage (all ranks wait for rank 0's write)."""
    if world().size > 1:
        import torch.distributed as td

        if td.is_initialized():
            td.barrier()
            td.destroy_process_group()
