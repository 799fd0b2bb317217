"""Training curves through DVCLive (one record per epoch)."""

from __future__ import annotations

import numbers
from pathlib import Path


class DVCLiveLogger:
    """Callable that logs a dict of numbers per epoch to `results/<stage>/` with DVCLive."""

    def __init__(self, directory: str | Path):
        from dvclive import Live

        self.live = Live(str(directory), dvcyaml=False, save_dvc_exp=False, report=None)

    def __call__(self, record: dict) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, numbers.Number) and not isinstance(value, bool):
                self.live.log_metric(key, float(value))
        self.live.next_step()

    def end(self) -> None:
        self.live.end()
