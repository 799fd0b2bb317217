"""Typed, frozen configuration loaded from params.yaml.

Each section of params.yaml is a frozen dataclass. Field metadata carries the allowed
values (`choices`) or range (`min`, `max`). Loading checks every key: an unknown key, a
wrong type or an out-of-range value raises `ParamsError` with one line that names the key
and what is allowed, before any stage does work.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ParamsError
from pipeline.fields import opt
from pipeline.sections import CRFConfig, ContrastConfig, DistillConfig, SegmentConfig, TransFGUConfig

DATASET_NAMES = ("synthetic", "camvid", "msrc_v2", "weizmann_horse", "voc2012", "folder", "cocostuff27", "cityscapes27")
BACKBONE_NAMES = ("dinov2_vits14", "dino_vits16", "dino_vits8", "dino_vitb8", "dino_vitb16", "mobilenet_v2", "resnet50")


@dataclass(frozen=True)
class BaseConfig:
    seed: int = opt(0, min=0)
    device: str = opt("cpu", choices=("cpu", "cuda", "auto"))
    threads: int = opt(2, min=0, max=256)
    nproc: int = opt(1, min=1, max=1024)
    precision: str = opt("auto", choices=("auto", "fp32", "bf16", "fp16"))
    dataset: str = opt("synthetic", choices=DATASET_NAMES)
    data_root: str = opt("data/synthetic")
    dataset_options: dict = opt({})
    train_split: str = opt("train")
    eval_split: str = opt("val")


@dataclass(frozen=True)
class SynthConfig:
    num_images: int = opt(300, min=4, max=100_000)
    image_size: int = opt(224, min=32, max=2048)
    val_fraction: float = opt(0.33, min=0.05, max=0.95)


@dataclass(frozen=True)
class WeightsConfig:
    cache_dir: str = opt("~/.cache/useg/wheels")


@dataclass(frozen=True)
class FeaturesConfig:
    backbone: str = opt("dinov2_vits14", choices=BACKBONE_NAMES)
    checkpoint: str = opt("models/weights/dinov2_vits14_imgfocus.pt")
    input_size: list = opt([224, 224])
    batch_size: int = opt(16, min=1, max=4096)
    store_keys: bool = opt(True)


@dataclass(frozen=True)
class BaselineConfig:
    methods: list = opt(["patch_kmeans", "rgbxy_kmeans"])
    num_clusters: int = opt(0, min=0, max=10_000)
    kmeans_iters: int = opt(100, min=1, max=10_000)
    kmeans_redo: int = opt(1, min=1, max=100)
    max_fit_tokens: int = opt(1_000_000, min=1000)
    rgbxy_xy_weight: float = opt(1.0, min=0.0)
    rgbxy_max_pixels: int = opt(200_000, min=1000)


@dataclass(frozen=True)
class EvaluateConfig:
    matching: str = opt("counts", choices=("counts", "iou"))
    num_overlays: int = opt(8, min=0, max=1000)


@dataclass(frozen=True)
class ProbeSection:
    epochs: int = opt(40, min=1, max=10_000)
    lr: float = opt(1e-3, min=0.0, max=10.0)
    weight_decay: float = opt(1e-4, min=0.0, max=10.0)
    batch_size: int = opt(16, min=1, max=4096)


@dataclass(frozen=True)
class MineConfig:
    method: str = opt("attention", choices=("attention", "saliency", "spectral"))
    saliency_source: str = opt("focus", choices=("focus", "prior"))
    num_heads_avg: int = opt(5, min=1, max=64)
    attn_mass: float = opt(0.5, min=0.01, max=1.0)
    topk: float = opt(0.4, min=0.01, max=1.0)
    center_keys: bool = opt(True)
    saliency_threshold: float = opt(0.5, min=0.0, max=1.0)
    min_component: float = opt(0.01, min=0.0, max=1.0)
    min_area: float = opt(0.01, min=0.0, max=1.0)
    masks_per_image: int = opt(1, min=1, max=64)
    spectral_min_area: float = opt(0.01, min=0.0, max=1.0)


@dataclass(frozen=True)
class ContrastMineConfig(MineConfig):
    """The `contrast_mine` params: MaskContrast's masks, saliency by default."""

    method: str = opt("saliency", choices=("attention", "saliency", "spectral"))


@dataclass(frozen=True)
class ContrastEvalConfig:
    """The `contrast_eval` params: MaskContrast's K-means, linear-probe and retrieval evaluation."""

    num_clusters: int = opt(0, min=0, max=10_000)
    kmeans_seeds: int = opt(5, min=1, max=100)
    kmeans_iters: int = opt(100, min=1, max=10_000)
    pca_dim: int = opt(32, min=1, max=4096)
    saliency_threshold: float = opt(0.5, min=0.0, max=1.0)


@dataclass(frozen=True)
class ClusterConfig:
    embedding: str = opt("cls_crop", choices=("cls_crop", "pooled"))
    backbone: str = opt("", choices=("",) + BACKBONE_NAMES)
    checkpoint: str = opt("")
    num_clusters: int = opt(0, min=0, max=10_000)
    overcluster: int = opt(1, min=1, max=100)
    kmeans_iters: int = opt(100, min=1, max=10_000)
    kmeans_redo: int = opt(5, min=1, max=100)
    crop_size: int = opt(224, min=14, max=1024)
    crop_pad: float = opt(0.0, min=0.0, max=1.0)
    batch_size: int = opt(32, min=1, max=4096)


@dataclass(frozen=True)
class FilterConfig:
    score_threshold: float = opt(0.9, min=0.0, max=1.0)
    min_keep: int = opt(1, min=1, max=1000)
    mask_threshold: float = opt(0.5, min=0.0, max=1.0)
    score_floor: float = opt(0.05, min=0.0, max=1.0)


@dataclass(frozen=True)
class Params:
    base: BaseConfig = field(default_factory=BaseConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    probe: ProbeSection = field(default_factory=ProbeSection)
    mine: MineConfig = field(default_factory=MineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    distill: "DistillConfig" = field(default_factory=lambda: DistillConfig())
    filter: FilterConfig = field(default_factory=FilterConfig)
    segment: "SegmentConfig" = field(default_factory=lambda: SegmentConfig())
    crf: "CRFSection" = field(default_factory=lambda: CRFSection())
    contrast_mine: ContrastMineConfig = field(default_factory=ContrastMineConfig)
    contrast: "ContrastConfig" = field(default_factory=lambda: ContrastConfig())
    contrast_eval: ContrastEvalConfig = field(default_factory=ContrastEvalConfig)
    transfgu: "TransFGUConfig" = field(default_factory=lambda: TransFGUConfig())

    def section_json(self, name: str) -> str:
        """Canonical JSON of `base` plus one section, for artifact provenance.

        `base.nproc` is left out: how many processes ran a stage does not change what it
        writes (sharded artifacts are byte-identical to one process's).
        """
        base = {k: v for k, v in dataclasses.asdict(self.base).items() if k != "nproc"}
        return json.dumps({"base": base, name: dataclasses.asdict(getattr(self, name))}, sort_keys=True)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp: Any, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params key '{key}': expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params key '{key}': expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params key '{key}': expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"params key '{key}': expected a string, got {value!r}")
    elif tp is list or origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"params key '{key}': expected a list, got {value!r}")
    elif tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"params key '{key}': expected a mapping, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ParamsError(f"params key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo or hi is not None and value > hi:
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ParamsError(f"params key '{key}': {value!r} is out of range {rng}")
    return value


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Validate a mapping against a frozen dataclass and build it."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params key '{prefix}': expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ParamsError(f"params key '{prefix}.{key}' is unknown (allowed: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = build_section(tp, raw[name], f"{prefix}.{name}")
        else:
            values[name] = _check_value(f"{prefix}.{name}", raw[name], tp, dict(f.metadata))
    obj = cls(**values)
    _post_checks(obj, prefix)
    return obj


BASELINE_METHODS = ("patch_kmeans", "rgbxy_kmeans")


def _post_checks(obj: Any, prefix: str) -> None:
    if isinstance(obj, BaselineConfig):
        bad = [m for m in obj.methods if m not in BASELINE_METHODS]
        if bad or not obj.methods:
            raise ParamsError(
                f"params key '{prefix}.methods': {bad or obj.methods!r} not allowed (a non-empty list of: {', '.join(BASELINE_METHODS)})"
            )
    if isinstance(obj, FeaturesConfig):
        size = obj.input_size
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 14 <= v <= 4096 for v in size):
            raise ParamsError(f"params key '{prefix}.input_size': expected [height, width], integers in [14, 4096], got {size!r}")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml. Raises `ParamsError` on the first bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    hints = typing.get_type_hints(Params)
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections")
    for key in raw:
        if key not in hints:
            raise ParamsError(f"params key '{key}' is unknown (sections: {', '.join(hints)})")
    return Params(**{k: build_section(hints[k], raw.get(k), k) for k in hints if k in raw})


def section_dict(obj: Any) -> dict:
    """A plain dict of a config dataclass (for JSON provenance)."""
    return dataclasses.asdict(obj)



@dataclass(frozen=True)
class CRFSection(CRFConfig):
    """The `crf` params: MaskContrast's dense-CRF settings plus how the pipeline uses them."""

    rounds: int = opt(0, min=0, max=20)
    predict: bool = opt(False)
