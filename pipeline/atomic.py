"""Atomic file writes that report a full disk as one clear line.

A file is written to a temporary file beside its destination, closed, then `os.replace`d
onto it, so a killed or failed write leaves the previous file untouched and no temporary
file behind. Writes go through `GuardedFile`, which records the first `OSError` and
swallows the rest of the writes: HDF5 (and torch's zip writer) cope badly with failing
writes (errors without errno, tracebacks from destructors, a crash at exit), but finish
cleanly on a file that seems to accept everything, after which the recorded error is
raised. ENOSPC, EDQUOT and EFBIG become `DiskFullError` (exit code 2).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import DiskFullError

#: errno values that mean "no room": disk full, quota exceeded, file-size limit.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class GuardedFile(io.FileIO):
    """A binary file whose failed writes are recorded in `error` instead of raised.

    After the first failure every later write and truncate is a no-op that reports success
    (the position still advances), so the writer runs to its end; the caller then checks
    `error`. Short writes are retried until complete.
    """

    error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        if self.error is None:
            try:
                while done < len(view):
                    done += super().write(view[done:])
            except OSError as e:
                self.error = e
        if done < len(view):
            self.seek(len(view) - done, os.SEEK_CUR)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return super().truncate(size)
            except OSError as e:
                self.error = e
        return self.tell() if size is None else size

    def fsync(self) -> None:
        if self.error is None:
            try:
                os.fsync(self.fileno())
            except OSError as e:
                self.error = e


def temp_sibling(dest: Path, suffix: str = ".tmp") -> Path:
    """`.NAME.PID<suffix>` beside `dest`, after removing what killed runs left under that pattern.

    A SIGKILL cannot be caught, so the temporary file or folder of a killed writer stays
    behind; the next write of the same output removes it.
    """
    own = re.compile(rf"\.{re.escape(dest.name)}\.[0-9]+{re.escape(suffix)}")
    for stale in dest.parent.glob(f".{glob.escape(dest.name)}.*{suffix}"):
        if own.fullmatch(stale.name):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    return dest.with_name(f".{dest.name}.{os.getpid()}{suffix}")


#: Set by the SIGINT handler of `guard_interrupts`; never reset within a process.
_interrupted = False
#: Depth of nested `signals_held` blocks, and whether a Ctrl-C arrived in the outermost one.
_hold_depth = 0
_held_sigint = False


def _on_sigint(signum, frame) -> None:
    global _interrupted, _held_sigint
    _interrupted = True
    if _hold_depth:  # inside `signals_held`: raised when the block ends
        _held_sigint = True
        return
    raise KeyboardInterrupt


def _unraisable(hook):
    def quiet(unraisable) -> None:
        if not (_interrupted and issubclass(unraisable.exc_type, KeyboardInterrupt)):
            hook(unraisable)

    return quiet


def guard_interrupts() -> None:
    """Record every Ctrl-C, so that an interrupt Python swallows still stops the next commit.

    Python raises the KeyboardInterrupt wherever the main thread is when SIGINT arrives; in a
    destructor or a weakref callback (garbage collection) it is printed as "Exception
    ignored" and the program runs on, so a stage could finish and commit its output after
    the user pressed Ctrl-C. Here the handler also sets a flag that `signals_blocked` (the
    commit point of every atomic write) and `raise_if_interrupted` check, and the swallowed
    KeyboardInterrupt is not printed. Call from the main thread; a no-op where SIGINT has a
    handler other than Python's default. It also makes `signals_held` hold a Ctrl-C that
    another thread received (see there).
    """
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _unraisable(sys.unraisablehook)


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C was recorded, even one whose exception was swallowed."""
    if _interrupted:
        raise KeyboardInterrupt


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block; one that arrives meanwhile is delivered after it.

    The signal mask covers only the calling thread: a signal sent to the process reaches any
    other thread that does not block it (numpy's BLAS threads, torch's), and Python then runs
    its handler in the main thread, inside the block. With `guard_interrupts` installed that
    handler only records a Ctrl-C here, and the KeyboardInterrupt is raised when the outermost
    block ends normally (an exception already leaving the block goes on; the Ctrl-C stays
    recorded for `raise_if_interrupted`). A SIGTERM that another thread receives still ends
    the process, like a SIGKILL.
    """
    global _hold_depth, _held_sigint
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    _hold_depth += 1
    try:
        yield
    finally:
        _hold_depth -= 1
        held = _held_sigint and not _hold_depth
        if held:
            _held_sigint = False
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # delivers a signal the mask held back
    if held:
        raise KeyboardInterrupt


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while an output is renamed into place.

    A Ctrl-C recorded before (see `guard_interrupts`) raises KeyboardInterrupt here instead,
    so nothing is committed after one.
    """
    with signals_held():
        raise_if_interrupted()
        yield


#: Outputs put in place since `forget_commits` (see `committed`), and the temporary folders of
#: the `staging` blocks still open: a file committed into one of those is not an output yet.
_committed: list[Path] = []
_staging: list[Path] = []


def record_commit(dest: str | Path) -> None:
    """Note that `dest` was just renamed into place, unless it lies in an open staged folder."""
    dest = Path(dest).absolute()
    if not any(dest.is_relative_to(s) for s in _staging):
        _committed.append(dest)


def committed() -> list[Path]:
    """Outputs put in place (complete) since `forget_commits`, in order: what a Ctrl-C that
    stops a command after them leaves behind. Files inside a staged folder count only when the
    folder itself is committed."""
    return list(_committed)


def forget_commits() -> None:
    """Start a new command's record of committed outputs."""
    _committed.clear()


@contextlib.contextmanager
def staging(tmp: Path) -> Iterator[None]:
    """Files committed under the temporary folder `tmp` are not outputs while the block runs."""
    tmp = Path(tmp).absolute()
    _staging.append(tmp)
    try:
        yield
    finally:
        _staging.remove(tmp)


def _raise_recorded(fh: GuardedFile, dest: Path) -> None:
    e = fh.error
    if e is None:
        return
    if e.errno in DISK_FULL_ERRNOS:
        raise DiskFullError(
            f"disk full writing {dest} ({os.strerror(e.errno)}): nothing was written and any previous "
            f"{dest.name} is unchanged; free some space and re-run"
        ) from None
    raise e


@contextlib.contextmanager
def replace_atomically(dest: str | Path, suffix: str = ".tmp", fsync: bool = False) -> Iterator[GuardedFile]:
    """Write `dest` through a temporary file in its folder; it appears only when complete.

    Args:
        dest: The file to write.
        suffix: Ending of the temporary file's name (`.{dest.name}.{pid}{suffix}`).
        fsync: Flush the data to disk before the replace.

    Raises:
        DiskFullError: A write failed for lack of space; the temporary file is removed and
            the previous `dest`, if any, is left as it was. Any other failed write is
            raised as its `OSError` the same way.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest, suffix)
    fh = GuardedFile(tmp, "w+")
    try:
        try:
            yield fh
        except BaseException:
            _raise_recorded(fh, dest)  # a writer tripped over the swallowed failure: report the cause
            raise
        if fsync:
            fh.fsync()
        fh.close()
        _raise_recorded(fh, dest)
        with signals_blocked():  # a SIGINT between close and replace must not leave a half-state
            os.replace(tmp, dest)
            record_commit(dest)
    except BaseException:
        fh.close()
        tmp.unlink(missing_ok=True)
        raise
