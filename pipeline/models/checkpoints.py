"""Reading user checkpoints in foreign layouts into our modules.

Handles plain state dicts and the usual wrappers: official DINO (`{"teacher": ...,
"student": ...}` with `backbone.` / `module.backbone.` prefixes and a projection head),
MoCo v2 (`{"state_dict": {"module.encoder_q.*", "module.encoder_k.*", "module.queue"}}`),
torchvision (`fc.*` / `classifier.*` heads). The prefix is found from the keys the module
expects; keys outside the module (heads, momentum encoders, queues) are ignored.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import WeightsError

# Wrapper keys tried in this order: DINO's teacher before its student (DINO evaluates the teacher).
_WRAPPERS = ("teacher", "state_dict", "model", "student", "module", "net")
# Prefix segments of a second copy of the network that must not win a tie.
_SECONDARY = ("encoder_k.", "momentum", "target", "ema.")
# Buffers that old checkpoints lack and that modules fill in themselves.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def read_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint with `weights_only=True` (DINO's `args` Namespace allowed).

    Raises:
        WeightsError: The file is missing or not a readable weights-only checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        raise WeightsError(f"{path}: not a readable weights-only checkpoint ({type(exc).__name__}: {exc})") from exc


def unwrap_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """Descend through wrapper dicts (`teacher`, `state_dict`, `model`, ...) to the tensors."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: unknown checkpoint layout: expected a dict of tensors, got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _candidate_prefixes(keys: list[str], required: set[str]) -> set[str]:
    """Prefixes p such that p + (an expected key) is a key of the checkpoint."""
    found: set[str] = set()
    for key in keys:
        if key in required:
            found.add("")
        for i, char in enumerate(key):
            if char == "." and key[i + 1 :] in required:
                found.add(key[: i + 1])
    return found


def _best_prefix(raw: Mapping[str, torch.Tensor], required: list[str]) -> tuple[str, int]:
    candidates = _candidate_prefixes(list(raw), set(required))
    if not candidates:
        return "", 0

    def rank(prefix: str) -> tuple[int, bool, int]:
        coverage = sum(prefix + k in raw for k in required)
        return (-coverage, any(s in prefix for s in _SECONDARY), len(prefix))

    best = min(sorted(candidates), key=rank)
    return best, -rank(best)[0]


def match_state_dict(
    raw: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: str | Path
) -> dict[str, torch.Tensor]:
    """Select and rename the checkpoint tensors that `expected` (a module's state dict) needs.

    Raises:
        WeightsError: No prefix covers all expected keys, or a tensor has the wrong shape.
    """
    required = [k for k in expected if not k.endswith(_OPTIONAL_SUFFIXES)]
    prefix, coverage = _best_prefix(raw, required)
    if coverage < len(required):
        missing = [k for k in required if prefix + k not in raw]
        sample = ", ".join(list(raw)[:5]) or "none"
        raise WeightsError(
            f"{path}: unknown checkpoint layout: {len(missing)} of {len(required)} expected keys missing "
            f"(prefix {prefix!r}), first missing: {', '.join(missing[:5])}; first keys in file: {sample}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, ref in expected.items():
        if prefix + key not in raw:
            continue
        tensor = raw[prefix + key]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise WeightsError(
                f"{path}: tensor {prefix + key!r} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
            )
        out[key] = tensor
    return out


def load_checkpoint_into(module: nn.Module, path: str | Path) -> None:
    """Load a checkpoint file of any supported layout into `module` (strict on expected keys)."""
    raw = unwrap_state_dict(read_checkpoint(path), path)
    state = match_state_dict(raw, module.state_dict(), path)
    module.load_state_dict(state, strict=True)
