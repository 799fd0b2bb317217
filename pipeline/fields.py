"""`opt`: a dataclass field carrying its validation metadata (allowed values, range).

Kept apart from `pipeline.config` so that modules defining their own params sections
(the trainers) can use it without importing the whole configuration.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, *, choices: tuple | None = None, min: float | None = None, max: float | None = None) -> Any:
    """A dataclass field with validation metadata."""
    meta = {"choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)
