"""Device, threads, precision and seeds from the `base` params."""

from __future__ import annotations

import contextlib
import os
import random

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
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base.device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params key 'base.device': 'cuda' asked for but no CUDA device is available (use cpu or auto)")
    return torch.device(base.device)


def autocast(base: BaseConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for `base.precision` (bf16 on CPU or CUDA, fp16 on CUDA only)."""
    if base.precision == "fp32":
        return contextlib.nullcontext()
    if base.precision == "fp16" and device.type != "cuda":
        raise ParamsError("params key 'base.precision': fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    dtype = torch.bfloat16 if base.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
