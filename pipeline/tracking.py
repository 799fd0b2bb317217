"""Training curves through DVCLive (one record per epoch)."""

from __future__ import annotations

import contextlib
import numbers
from pathlib import Path

from pipeline.artifacts import staged_folder


class DVCLiveLogger:
    """Callable that logs a dict of numbers per epoch to `results/<stage>/` with DVCLive.

    DVCLive writes into a temporary folder beside `directory`, which replaces `directory` at
    `end()`: an interrupted training run leaves the previous curves as they were. Used as a
    context manager, it ends on success and removes the temporary folder on an exception.
    """

    def __init__(self, directory: str | Path):
        from dvclive import Live

        self._stage = contextlib.ExitStack()
        tmp = self._stage.enter_context(staged_folder(directory))
        self.live = Live(str(tmp), dvcyaml=False, save_dvc_exp=False, report=None)

    def __call__(self, record: dict) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, numbers.Number) and not isinstance(value, bool):
                self.live.log_metric(key, float(value))
        self.live.next_step()

    def end(self) -> None:
        """Finish the curves and move them into place."""
        self.live.end()
        self._stage.close()

    def __enter__(self) -> DVCLiveLogger:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.end()
        else:
            self._stage.__exit__(*exc)


def training_curves(directory: str | Path) -> contextlib.AbstractContextManager[DVCLiveLogger | None]:
    """The DVCLive logger of a training stage on rank 0; None on the other DDP ranks."""
    import os

    if int(os.environ.get("RANK", "0")) > 0:
        return contextlib.nullcontext(None)
    return DVCLiveLogger(directory)
