"""Rich progress bars for every loop over images or epochs."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None, disable: bool = False) -> Iterable[T]:
    """Iterate with a Rich progress bar on stderr (quiet when USEG_QUIET=1)."""
    if disable or os.environ.get("USEG_QUIET") == "1" or int(os.environ.get("RANK", "0")) > 0:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    from rich.console import Console

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        for it in items:
            yield it
            bar.advance(task)
