"""HDF5 artifacts: schema, provenance, ragged data, atomic and byte-identical writes.

Every stage output is one HDF5 file whose root attributes record the schema name and
version, the stage, the stage's params (JSON), the code version, the dataset fingerprint
and the ids of the input artifacts. Files are written to a temporary file in the same
folder and `os.replace`d into place, so a killed stage never leaves a half-written
artifact. Inputs are opened read-only (DVC may hard-link them from its cache). No
timestamps are stored, so identical inputs give byte-identical files.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import h5py
import numpy as np

from pipeline import __version__
from pipeline.atomic import record_commit, replace_atomically, signals_blocked, signals_held, staging, temp_sibling
from pipeline.errors import ArtifactError

#: Current version of every schema this code writes and reads.
SCHEMAS: dict[str, int] = {
    "useg.index": 1,
    "useg.features": 1,
    "useg.predictions": 1,
    "useg.masks": 1,
    "useg.clusters": 1,
    "useg.pseudolabels": 1,
    "useg.concepts": 1,
    "useg.cams": 1,
}

_CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class Provenance:
    """What an artifact was made from."""

    stage: str
    params_json: str
    dataset_fingerprint: str
    inputs: dict[str, str]

    def artifact_id(self, schema: str) -> str:
        """A content id over everything that determines the artifact."""
        blob = json.dumps(
            {
                "schema": schema,
                "version": SCHEMAS[schema],
                "stage": self.stage,
                "params": self.params_json,
                "code": __version__,
                "dataset": self.dataset_fingerprint,
                "inputs": self.inputs,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


@contextlib.contextmanager
def write_artifact(path: str | Path, schema: str, prov: Provenance) -> Iterator[h5py.File]:
    """Open a new artifact for writing; it appears at `path` only when complete.

    On any exception (including KeyboardInterrupt) the temporary file is removed and the
    previous artifact at `path`, if any, is left untouched. A full disk raises
    `DiskFullError` naming `path` (see `pipeline.atomic`).
    """
    if schema not in SCHEMAS:
        raise ArtifactError(f"unknown artifact schema {schema!r}")
    path = Path(path)
    with replace_atomically(path, suffix=".tmp.h5") as fh:  # makes the folder too
        f = None
        try:
            # A Ctrl-C inside h5py's create or close would leave HDF5 holding the file ID, whose
            # deallocation at exit then prints a traceback on the already closed temporary file.
            with signals_held():
                f = h5py.File(fh, "w", libver=("earliest", "v110"), track_order=False)
            attrs = f.attrs
            attrs["schema"] = schema
            attrs["schema_version"] = SCHEMAS[schema]
            attrs["stage"] = prov.stage
            attrs["params"] = prov.params_json
            attrs["code_version"] = __version__
            attrs["dataset_fingerprint"] = prov.dataset_fingerprint
            attrs["inputs"] = json.dumps(prov.inputs, sort_keys=True)
            attrs["artifact_id"] = prov.artifact_id(schema)
            yield f
        except BaseException:
            if f is not None:
                with contextlib.suppress(Exception), signals_held():
                    f.close()
            raise
        with signals_held():
            f.close()


def open_artifact(
    path: str | Path, schema: str, dataset_fingerprint: str | None = None
) -> h5py.File:
    """Open an artifact read-only and check its schema, version and dataset fingerprint."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: artifact not found (run its stage first)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ArtifactError(f"{path}: not a readable HDF5 artifact ({e})") from None
    got = f.attrs.get("schema")
    if got != schema:
        f.close()
        raise ArtifactError(f"{path}: schema is {got!r}, expected {schema!r}")
    ver = int(f.attrs.get("schema_version", -1))
    if ver != SCHEMAS[schema]:
        f.close()
        raise ArtifactError(
            f"{path}: schema {schema} version {ver}, this code reads version {SCHEMAS[schema]}: re-run its stage"
        )
    if dataset_fingerprint is not None and f.attrs.get("dataset_fingerprint") != dataset_fingerprint:
        fp = str(f.attrs.get("dataset_fingerprint"))[:12]
        f.close()
        raise ArtifactError(
            f"{path}: made from another dataset (fingerprint {fp}..., expected {dataset_fingerprint[:12]}...): re-run its stage"
        )
    return f


def chunk_rows(row_shape: Sequence[int], dtype: np.dtype, n_rows: int) -> tuple[int, ...]:
    """Chunk shape of about 256 KiB along the first axis."""
    row_bytes = max(1, int(np.prod(row_shape)) * np.dtype(dtype).itemsize)
    rows = max(1, min(max(n_rows, 1), _CHUNK_BYTES // row_bytes))
    return (rows, *row_shape)


def create_dataset(f: h5py.Group, name: str, shape: Sequence[int], dtype, compression: str | None = "gzip") -> h5py.Dataset:
    """A chunked dataset (no timestamps) of a fixed shape, compressed unless `compression` is None."""
    shape = tuple(int(s) for s in shape)
    kw = {}
    if shape[0] > 0:
        kw["chunks"] = chunk_rows(shape[1:], np.dtype(dtype), shape[0])
    if compression and shape[0] > 0:
        kw.update(compression=compression, shuffle=True)
        if compression == "gzip":
            kw["compression_opts"] = 4
    return f.create_dataset(name, shape=shape, dtype=dtype, track_times=False, **kw)


class RaggedWriter:
    """Append variable-size arrays to one flat chunked dataset plus offsets and shapes.

    Layout under `group`: `data` (flat, 1-D), `offsets` (N+1, int64), `shapes` (N, ndim).
    """

    def __init__(self, f: h5py.Group, name: str, dtype, ndim: int, compression: str = "gzip"):
        self.g = f.create_group(name, track_order=False)
        self.ndim = ndim
        chunk = max(1, _CHUNK_BYTES // np.dtype(dtype).itemsize)
        kw = dict(compression=compression, shuffle=True)
        if compression == "gzip":
            kw["compression_opts"] = 4
        self.data = self.g.create_dataset(
            "data", shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,), track_times=False, **kw
        )
        # int64 arrays, not lists of Python ints and tuples: ~8 bytes per value, not ~40
        self.offsets = array.array("q", [0])
        self.shapes = array.array("q")

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        if arr.ndim != self.ndim:
            raise ValueError(f"expected a {self.ndim}-d array, got shape {arr.shape}")
        n0 = self.offsets[-1]
        n1 = n0 + arr.size
        self.data.resize((n1,))
        self.data[n0:n1] = arr.reshape(-1)
        self.offsets.append(n1)
        self.shapes.extend(arr.shape)

    def close(self) -> None:
        self.g.create_dataset("offsets", data=np.asarray(self.offsets, dtype=np.int64), track_times=False)
        self.g.create_dataset(
            "shapes", data=np.asarray(self.shapes, dtype=np.int64).reshape(-1, self.ndim), track_times=False
        )


class RowSpool:
    """Rows of one fixed shape appended to an unnamed temporary file, read back in blocks.

    For a per-item array whose final HDF5 dataset needs its row count up front (a fixed-shape
    chunked dataset): the rows wait on disk, not in RAM, and `write_to` copies them over in
    whole chunks, which gives the same file bytes as one write of the whole array.
    """

    def __init__(self, shape: Sequence[int], dtype, folder: str | Path | None = None):
        self.shape = tuple(int(v) for v in shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.fh = tempfile.TemporaryFile(dir=folder)
        self.n = 0

    def append(self, row: np.ndarray) -> None:
        a = np.ascontiguousarray(row, dtype=self.dtype)
        if a.shape != self.shape:
            raise ValueError(f"expected a row of shape {self.shape}, got {a.shape}")
        self.fh.write(a.tobytes())
        self.n += 1

    def write_to(self, dset: h5py.Dataset, max_bytes: int = 64 << 20) -> None:
        """Copy every row into `dset` (shape (n, *shape)) in blocks of whole chunks, then close."""
        if dset.shape != (self.n, *self.shape):
            raise ValueError(f"dataset shape {dset.shape} does not hold {self.n} rows of {self.shape}")
        step = dset.chunks[0] if dset.chunks else 1
        rows = max(step, max_bytes // max(1, self.row_bytes) // step * step)
        self.fh.seek(0)
        for start in range(0, self.n, rows):
            k = min(rows, self.n - start)
            block = np.frombuffer(self.fh.read(k * self.row_bytes), dtype=self.dtype)
            dset[start : start + k] = block.reshape(k, *self.shape)
        self.close()

    def close(self) -> None:
        self.fh.close()


class RaggedReader:
    """Random access to arrays written by `RaggedWriter`."""

    def __init__(self, f: h5py.Group, name: str):
        if name not in f:
            raise ArtifactError(f"{getattr(f, 'filename', '?')}: has no ragged dataset {name!r}")
        g = f[name]
        self.data = g["data"]
        self.offsets = g["offsets"][()]
        self.shapes = g["shapes"][()]

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> np.ndarray:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.data[a:b].reshape(tuple(self.shapes[i]))


def string_dataset(f: h5py.Group, name: str, values: Sequence[str]) -> None:
    """Store a list of strings as a fixed-order UTF-8 dataset."""
    dt = h5py.string_dtype("utf-8")
    f.create_dataset(name, data=np.asarray(list(values), dtype=object), dtype=dt, track_times=False)


def read_strings(f: h5py.Group, name: str) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in f[name][()]]


def describe(path: str | Path) -> str:
    """Human-readable summary of an artifact: attributes and datasets."""
    path = Path(path)
    lines = [str(path)]
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ArtifactError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        for k in sorted(f.attrs):
            v = f.attrs[k]
            s = v if not isinstance(v, bytes) else v.decode()
            s = str(s)
            if len(s) > 200:
                s = s[:200] + "..."
            lines.append(f"  @{k} = {s}")

        def visit(name: str, obj) -> None:
            if isinstance(obj, h5py.Dataset):
                comp = obj.compression or "none"
                lines.append(f"  {name}: {obj.dtype} {obj.shape} chunks={obj.chunks} {comp}")

        f.visititems(visit)
    return "\n".join(lines)


def file_md5(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_file(dest: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside `dest` for binary writing; it replaces `dest` when the block ends.

    On an exception (KeyboardInterrupt included) the temporary file is removed and `dest` is
    left as it was; after a SIGKILL it stays behind and the next write of `dest` removes it.
    A full disk raises `DiskFullError` (see `pipeline.atomic`).
    """
    with replace_atomically(dest, fsync=True) as fh:
        yield fh


def atomic_write_bytes(dest: str | Path, data: bytes) -> None:
    """Write `data` to `dest` through `atomic_file`."""
    with atomic_file(dest) as fh:
        fh.write(data)


def write_json(dest: str | Path, obj, default=None) -> None:
    """Write `obj` as indented, key-sorted JSON through `atomic_file`."""
    atomic_write_bytes(dest, (json.dumps(obj, indent=2, sort_keys=True, default=default) + "\n").encode())


@contextlib.contextmanager
def staged_folder(dest: str | Path) -> Iterator[Path]:
    """An empty temporary folder beside `dest` that replaces `dest` when the block ends without error.

    The previous `dest` is renamed aside and deleted only after the new folder is in place, so
    a reader sees the old folder or the new one, never a half-written one. On an exception the
    temporary folder is removed; after a SIGKILL the next write of `dest` removes it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    try:
        tmp.mkdir()
        with staging(tmp):
            yield tmp
        old = temp_sibling(dest, ".old")
        with signals_blocked():
            if dest.exists():
                os.replace(dest, old)
            os.replace(tmp, dest)
            record_commit(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(state: dict, out: str | Path) -> None:
    """`torch.save` a checkpoint atomically (through `atomic_file`).

    Saving through a file object, not a path, keeps the temporary name out of the archive.
    """
    import torch

    with atomic_file(out) as fh:
        torch.save(state, fh)


def load_checkpoint(path: str | Path, fingerprint: str | None, what: str, stage: str) -> dict:
    """Load a checkpoint written by `save_checkpoint`.

    Args:
        path: The checkpoint.
        fingerprint: Expected dataset fingerprint; None skips the check.
        what: What it is, for messages ("segmenter").
        stage: The `useg` command that writes it, for messages.

    Raises:
        ArtifactError: Missing file, or trained on another dataset.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: {what} checkpoint not found (run `useg {stage}`)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if fingerprint is not None and state.get("dataset_fingerprint") != fingerprint:
        raise ArtifactError(f"{path}: trained on another dataset: re-run `useg {stage}`")
    return state


def write_predictions(
    out: str | Path, prov: Provenance, ids: Sequence[str], positions: np.ndarray,
    num_clusters: dict[str, int], records,
) -> None:
    """Write a `useg.predictions` artifact: one group of ragged uint16 label maps per method.

    Args:
        ids: Sample ids of the evaluated images, in order.
        positions: Their positions in the index.
        num_clusters: Label count per method name, in the order the groups are written.
        records: Per image, in order, {method: label map (H, W)}.
    """
    with write_artifact(out, "useg.predictions", prov) as f:
        string_dataset(f, "ids", list(ids))
        f.create_dataset("positions", data=positions, track_times=False)
        f.attrs["methods"] = ",".join(num_clusters)
        writers = {}
        for m, k in num_clusters.items():
            g = f.create_group(m)
            g.attrs["num_clusters"] = int(k)
            writers[m] = RaggedWriter(g, "labels", np.uint16, 2)
        for rec in records:
            for m, labels in rec.items():
                writers[m].append(labels.astype(np.uint16, copy=False))
        for w in writers.values():
            w.close()
