"""The params sections of the training stages (distill, segment, crf, contrast, transfgu).

They live here, apart from their trainers, so that reading and validating params.yaml
(`pipeline.config`) imports no torch: a stage that needs no model (synth, prepare, evaluate,
report) starts in about a second, and a bad key stops any stage before torch is loaded.
The trainer modules re-export their section (`from pipeline.segmenter import SegmentConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ParamsError
from pipeline.fields import opt

#: The official PASCAL VOC teacher-update intervals of TransFGU, one per block of 10 epochs.
VOC_UPDATE_INTERVALS = [5, 5, 5, 5, 4, 4, 4, 4, 4, 3]


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class DistillConfig:
    """Training of the initial Mask R-CNN (the `distill` stage).

    SGD with a linear warm-up, then the learning rate times 0.1 at each fraction of the
    run in `lr_steps` (detectron2's 1x schedule decays at 2/3 and 8/9 of training).
    """

    epochs: int = opt(12, min=1, max=10_000)
    batch_size: int = opt(4, min=1, max=1024)
    lr: float = opt(0.01, min=0.0, max=10.0)
    momentum: float = opt(0.9, min=0.0, max=1.0)
    weight_decay: float = opt(1e-4, min=0.0, max=1.0)
    warmup_iters: int = opt(50, min=0)
    lr_steps: list = opt([0.667, 0.889])
    min_size: int = opt(224, min=32, max=4096)
    max_size: int = opt(448, min=32, max=8192)
    trainable_layers: int = opt(3, min=0, max=6)
    fpn_channels: int = opt(128, min=16, max=1024)
    rois_per_image: int = opt(128, min=8, max=4096)
    clip_grad_norm: float = opt(10.0, min=0.0)
    hflip: bool = opt(True)
    seed: int = opt(0, min=0)

    def __post_init__(self) -> None:
        if any(not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 < s < 1 for s in self.lr_steps):
            raise ParamsError(
                f"params key 'distill.lr_steps': expected fractions of the run in (0, 1), got {self.lr_steps!r}"
            )
        if self.max_size < self.min_size:
            raise ParamsError(f"params key 'distill.max_size': {self.max_size} is below min_size {self.min_size}")


@dataclass(frozen=True)
class SegmentConfig:
    """Training of the final segmenter (the `segment` stage)."""

    epochs: int = opt(20, min=1, max=10_000)
    batch_size: int = opt(8, min=2, max=1024)
    lr: float = opt(0.01, min=0.0, max=10.0)
    momentum: float = opt(0.9, min=0.0, max=1.0)
    weight_decay: float = opt(1e-4, min=0.0, max=1.0)
    poly_power: float = opt(0.9, min=0.0, max=10.0)
    crop_size: int = opt(224, min=16, max=4096)
    scale_range: list = opt([0.75, 1.25])
    hflip: bool = opt(True)
    ohem_fraction: float = opt(0.2, min=0.0, max=1.0)
    output_stride: int = opt(16, choices=(8, 16))
    model: str = opt("deeplabv3", choices=("deeplabv3", "token_head"))
    seed: int = opt(0, min=0)

    def __post_init__(self) -> None:
        lo_hi = self.scale_range
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lo_hi)
        if len(lo_hi) != 2 or not numbers or not 0 < lo_hi[0] <= lo_hi[1]:
            raise ParamsError(
                f"params key 'segment.scale_range': expected [low, high] with 0 < low <= high, got {lo_hi!r}"
            )
        if self.ohem_fraction <= 0:
            raise ParamsError("params key 'segment.ohem_fraction': must be in (0, 1]")


@dataclass(frozen=True)
class CRFConfig:
    """Dense CRF settings (defaults: MaskContrast / MaskDistill)."""

    iters: int = opt(10, min=1, max=1000)
    gauss_sxy: float = opt(1.0, min=0.0)
    gauss_compat: float = opt(3.0, min=0.0)
    bilateral_sxy: float = opt(67.0, min=0.0)
    bilateral_srgb: float = opt(3.0, min=0.0)
    bilateral_compat: float = opt(4.0, min=0.0)


@dataclass(frozen=True)
class ContrastConfig:
    """Training of the MaskContrast model (the `contrast` params)."""

    epochs: int = opt(10, min=1, max=10_000)
    batch_size: int = opt(16, min=2, max=1024)
    lr: float = opt(0.004, min=0.0, max=10.0)
    momentum: float = opt(0.9, min=0.0, max=1.0)
    weight_decay: float = opt(1e-4, min=0.0, max=1.0)
    poly_power: float = opt(0.9, min=0.0, max=10.0)
    crop_size: int = opt(224, min=16, max=4096)
    min_scale: float = opt(0.2, min=0.01, max=1.0)
    temperature: float = opt(0.5, min=1e-4, max=100.0)
    queue_size: int = opt(128, min=0, max=1_000_000)
    key_momentum: float = opt(0.999, min=0.0, max=1.0)
    momentum_encoder: bool = opt(True)
    views: bool = opt(True)
    min_salient: float = opt(0.01, min=0.0, max=1.0)
    max_salient: float = opt(0.99, min=0.0, max=1.0)
    output_stride: int = opt(16, choices=(8, 16))
    backbone: str = opt("mobilenet_v2", choices=("mobilenet_v2", "features"))
    seed: int = opt(0, min=0)

    def __post_init__(self) -> None:
        if self.queue_size % self.batch_size:
            raise ParamsError(
                f"params key 'contrast.queue_size': {self.queue_size} is not a multiple of "
                f"contrast.batch_size ({self.batch_size})"
            )
        if not self.min_salient < self.max_salient:
            raise ParamsError("params key 'contrast.min_salient': must be below contrast.max_salient")


@dataclass(frozen=True)
class TransFGUConfig:
    """TransFGU's concept discovery, pseudo-labels and decoder training (the `transfgu` params)."""

    # concept discovery
    window_fractions: list = opt([0.6, 0.5, 0.4, 0.3])
    fg_min: float = opt(0.5, min=0.0, max=1.0)
    bg_min: float = opt(0.8, min=0.0, max=1.0)
    scene_centric: bool = opt(False)
    windows: str = opt("attention", choices=("attention", "all"))
    crop_size: int = opt(224, min=8, max=4096)
    concept_images: int = opt(0, min=0, max=100_000_000)
    input_size: list = opt([])
    num_things: int = opt(0, min=0, max=10_000)
    num_stuff: int = opt(0, min=0, max=10_000)
    kmeans_iters: int = opt(100, min=1, max=100_000)
    # CAM pseudo-labels
    cam_mass: float = opt(0.8, min=0.0, max=1.0)
    cam_batch: int = opt(8, min=1, max=4096)
    bg_threshold: float = opt(0.1, min=0.0, max=1.0)
    # decoder
    d_model: int = opt(384, min=8, max=8192)
    decoder_depth: int = opt(2, min=1, max=64)
    decoder_heads: int = opt(6, min=1, max=256)
    dropout: float = opt(0.1, min=0.0, max=1.0)
    # training
    epochs: int = opt(20, min=1, max=10_000)
    batch_size: int = opt(16, min=1, max=4096)
    lr: float = opt(1e-4, min=0.0, max=10.0)
    weight_decay: float = opt(5e-4, min=0.0, max=1.0)
    grad_clip: float = opt(1.0, min=0.0, max=1e6)
    train_size: int = opt(224, min=8, max=4096)
    min_scale: float = opt(0.4, min=0.01, max=1.0)
    hflip: bool = opt(True)
    photometric: bool = opt(True)
    weight_cat: float = opt(1.0, min=0.0, max=1000.0)
    weight_unc: float = opt(0.3, min=0.0, max=1000.0)
    weight_emb: float = opt(1.0, min=0.0, max=1000.0)
    alpha_start: float = opt(0.03, min=0.0, max=10.0)
    alpha_end: float = opt(0.10, min=0.0, max=10.0)
    alpha_ramp_epochs: int = opt(8, min=0, max=10_000)
    teacher_weight: float = opt(0.5, min=0.0, max=1.0)
    bootstrap_start: int = opt(5, min=0, max=10_000)
    bootstrap_every: list = opt(list(VOC_UPDATE_INTERVALS))
    bootstrap_span: int = opt(10, min=1, max=10_000)
    seed: int = opt(0, min=0)

    def __post_init__(self) -> None:
        fr = self.window_fractions
        if not fr or not all(_is_number(v) and 0 < v <= 1 for v in fr):
            raise ParamsError(
                f"params key 'transfgu.window_fractions': expected a non-empty list of numbers in (0, 1], got {fr!r}"
            )
        every = self.bootstrap_every
        if not every or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in every):
            raise ParamsError(
                f"params key 'transfgu.bootstrap_every': expected a non-empty list of integers >= 1, got {every!r}"
            )
        if self.d_model % self.decoder_heads:
            raise ParamsError(
                f"params key 'transfgu.d_model': {self.d_model} is not divisible by "
                f"transfgu.decoder_heads ({self.decoder_heads})"
            )
        if self.alpha_start > self.alpha_end:
            raise ParamsError("params key 'transfgu.alpha_start': must not exceed transfgu.alpha_end")
        size = self.input_size
        if size and (len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 8 for v in size)):
            raise ParamsError(f"params key 'transfgu.input_size': expected [] or [height, width] integers >= 8, got {size!r}")
        if self.windows == "all" and not self.scene_centric:
            raise ParamsError("params key 'transfgu.windows': 'all' (every window, no attention filter) needs "
                              "transfgu.scene_centric: true (no background class)")
        if self.windows == "all" and self.num_stuff:
            raise ParamsError("params key 'transfgu.num_stuff': transfgu.windows 'all' clusters every window into "
                              f"one set of concepts, so num_stuff must be 0 (got {self.num_stuff})")
        if self.cam_mass <= 0:
            raise ParamsError("params key 'transfgu.cam_mass': must be in (0, 1]")
