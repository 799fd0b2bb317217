"""`base.precision: auto` picks bf16 only where it runs in hardware."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline import runtime
from pipeline.config import BaseConfig
from pipeline.errors import ParamsError


@pytest.mark.parametrize("native, expect", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, native, expect):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    base = dataclasses.replace(BaseConfig(), precision="auto")
    assert runtime.resolve_precision(base, torch.device("cpu")) == expect


def test_explicit_precision_is_kept_and_fp16_needs_cuda():
    base = dataclasses.replace(BaseConfig(), precision="bf16")
    assert runtime.resolve_precision(base, torch.device("cpu")) == "bf16"
    with pytest.raises(ParamsError, match="base.precision"):
        runtime.autocast(dataclasses.replace(BaseConfig(), precision="fp16"), torch.device("cpu"))
