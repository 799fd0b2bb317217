"""Device, threads, precision and seeds from the `base` params."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.config import BaseConfig
from pipeline.errors import ParamsError


def setup(base: BaseConfig) -> torch.device:
    """Seed every RNG, set thread counts and deterministic CPU kernels; return the device."""
    random.seed(base.seed)
    np.random.seed(base.seed)
    torch.manual_seed(base.seed)
    if base.threads > 0:
        torch.set_num_threads(base.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if base.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif base.device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params key 'base.device': 'cuda' asked for but no CUDA device is available (use cpu or auto)")
    else:
        device = torch.device(base.device)
    from pipeline import dist

    return dist.init(device)


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates
    bf16 matmuls and they run several times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(base: BaseConfig, device: torch.device) -> str:
    """The precision actually used: `auto` is bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if base.precision != "auto":
        return base.precision
    if device.type == "cuda" or cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast(base: BaseConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for `base.precision` (bf16 on CPU or CUDA, fp16 on CUDA only, auto: see
    `resolve_precision`)."""
    precision = resolve_precision(base, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ParamsError("params key 'base.precision': fp16 needs a CUDA device (use bf16, auto or fp32 on CPU)")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
