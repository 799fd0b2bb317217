"""MaskDistill's final segmenter: DeepLabv3 trained on the filtered pseudo-label maps.

MaskDistill trains a DeepLabv3 (ASPP rates 12/24/36) on a MoCo v2 ResNet-50 dilated to
output stride 8, with SGD, cross-entropy with OHEM (hardest 20% of pixels, ignore 255),
flips and 0.75-1.25 rescaling. Here the trunk is MobileNetV2 (ImageNet-supervised or
random), whose last two stages are dilated to output stride 16 by default (ASPP rates
6/12/18, the DeepLabv3 paper's rates for stride 16): stride 8 costs 3.7x the forward FLOPs
(torch.utils.flop_counter) for a gain that stays inside the seed spread on MSRC-v2 and
CamVid. `output_stride=8` (rates 12/24/36) is available. The learning rate follows a
poly schedule (the official configs use a step decay at epoch 40 of 45).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from pipeline.sections import SegmentConfig  # noqa: F401  (the params section, torch-free; re-exported)
from pipeline.errors import DataError, UsegError
from pipeline.features import preprocess
from pipeline import dist
from pipeline.losses import IGNORE_INDEX, ohem_cross_entropy
from pipeline.maskrcnn import ImageSource, item, iter_batches, mobilenet_v2_features
from pipeline.progress import track

MOBILENET_V2_OUT_CHANNELS = 320  # features[17]; the 1x1 conv to 1280 is dropped
ATROUS_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
# The MobileNetV2 blocks of the stride-16 stage and of the stride-32 stage.
STRIDE16_BLOCKS = slice(7, 14)
STRIDE32_BLOCKS = slice(14, 18)


def _nostride_dilate(module: nn.Module, dilate: int) -> None:
    """Turn a stride-2 3x3 conv into stride 1 (dilation dilate/2), dilate the other 3x3 convs."""
    if not isinstance(module, nn.Conv2d) or module.kernel_size != (3, 3):
        return
    if module.stride == (2, 2):
        module.stride = (1, 1)
        module.dilation = module.padding = (dilate // 2, dilate // 2)
    else:
        module.dilation = module.padding = (dilate, dilate)


def dilate_mobilenet_v2(features: nn.Sequential, output_stride: int) -> None:
    """Dilate MobileNetV2 `features` in place to output stride 16 or 8 (from 32)."""
    if output_stride not in ATROUS_RATES:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    if output_stride == 8:
        for block in features[STRIDE16_BLOCKS]:
            block.apply(partial(_nostride_dilate, dilate=2))
    dilate = 2 if output_stride == 16 else 4
    for block in features[STRIDE32_BLOCKS]:
        block.apply(partial(_nostride_dilate, dilate=dilate))


class DeepLabV3(nn.Module):
    """DeepLabv3: a dilated trunk, torchvision's `DeepLabHead` (ASPP + 3x3 conv + classifier),
    logits bilinearly upsampled to the input size."""

    def __init__(self, backbone: nn.Module, in_channels: int, num_classes: int, atrous_rates: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = DeepLabHead(in_channels, num_classes, tuple(atrous_rates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised images -> (B, num_classes, H, W) logits."""
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_deeplab(num_classes: int, backbone_weights: Path | None, output_stride: int = 16) -> DeepLabV3:
    """DeepLabv3 on a MobileNetV2 trunk (`features[:18]`, 320 channels), dilated.

    MaskDistill used a ResNet-50 (MoCo v2) at output stride 8; MobileNetV2 at stride 16
    is the CPU-friendly default here (see the module docstring).

    Args:
        num_classes: Output classes, background included (K pseudo-classes + 1).
        backbone_weights: torchvision MobileNetV2 ImageNet state dict, or None (random init).
        output_stride: 16 (ASPP rates 6, 12, 18) or 8 (rates 12, 24, 36).

    Returns:
        The model in train mode; it takes ImageNet-normalised input.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    features = mobilenet_v2_features(backbone_weights)[:18]
    dilate_mobilenet_v2(features, output_stride)
    return DeepLabV3(features, MOBILENET_V2_OUT_CHANNELS, num_classes, ATROUS_RATES[output_stride])


def poly_lr(base_lr: float, iteration: int, total: int, power: float) -> float:
    """Poly schedule: base_lr * (1 - iteration / total) ** power."""
    return base_lr * (1.0 - iteration / total) ** power


def augment(
    image: np.ndarray, label: np.ndarray, cfg: SegmentConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rescale, pad (label 255), random crop to `crop_size`, random flip.

    Returns:
        (normalised image (3, crop, crop), label long (crop, crop)).
    """
    if label.shape != image.shape[:2]:
        raise DataError(f"label map of shape {label.shape} does not match its image {image.shape[:2]}")
    scale = rng.uniform(*cfg.scale_range)
    h, w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    x = preprocess(image, (h, w))
    y = torch.from_numpy(np.ascontiguousarray(label)).long()
    if (h, w) != label.shape:
        y = F.interpolate(y[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    x, y = _pad_to(x, y, cfg.crop_size)
    top = int(rng.integers(0, x.shape[1] - cfg.crop_size + 1))
    left = int(rng.integers(0, x.shape[2] - cfg.crop_size + 1))
    x = x[:, top : top + cfg.crop_size, left : left + cfg.crop_size]
    y = y[top : top + cfg.crop_size, left : left + cfg.crop_size]
    if cfg.hflip and rng.random() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return x.contiguous(), y.contiguous()


def _pad_to(x: torch.Tensor, y: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right to at least `size`: image with 0 (the mean colour), label with 255."""
    ph, pw = max(0, size - x.shape[1]), max(0, size - x.shape[2])
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=0.0)
        y = F.pad(y, (0, pw, 0, ph), value=IGNORE_INDEX)
    return x, y


def _count(images: ImageSource, labels: ImageSource, num_images: int | None) -> int:
    if num_images is not None:
        return num_images
    for source in (labels, images):
        if not callable(source):
            return len(source)
    raise ValueError("num_images is required when both images and labels are loader callables")


def _check_labels(label: np.ndarray, num_classes: int, index: int) -> None:
    bad = (label != IGNORE_INDEX) & (label >= num_classes)
    if bad.any():
        raise DataError(
            f"label map {index}: class id {int(label[bad][0])} out of range ({num_classes} classes, 255 = ignore)"
        )


def train_segmenter(
    images: ImageSource,
    labels: ImageSource,
    num_classes: int,
    cfg: SegmentConfig,
    backbone_weights: Path | None = None,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    device: torch.device | str = "cpu",
    num_images: int | None = None,
    model: DeepLabV3 | None = None,
) -> DeepLabV3:
    """Train DeepLabv3 on pseudo-label maps with SGD, a poly schedule and OHEM cross-entropy.

    Batches of `batch_size` crops, reshuffled each epoch; the last incomplete batch is
    dropped (batch norm in the ASPP pooling branch needs >= 2 samples) unless it is the
    only one. Deterministic on CPU for a given `seed`.

    Args:
        images: uint8 RGB images (H, W, 3), a sequence or a loader `f(position)`.
        labels: uint8 label maps (H, W) of the same sizes: 0..num_classes-1, 255 = ignore.
        num_classes: Output classes (background included).
        cfg: Training configuration.
        backbone_weights: MobileNetV2 ImageNet state dict, or None (random init).
        progress: Show a progress bar over iterations.
        log: Called once per epoch with {"epoch", "loss", "lr"}.
        device: Where to train.
        num_images: Number of images; needed only when both sources are callables.
        model: Continue training this model (CRF self-training rounds); None builds one.

    Returns:
        The trained model, in eval mode.

    Raises:
        DataError: Fewer than 2 images, a size mismatch or a class id out of range.
        UsegError: The loss became NaN or infinite (lower `lr`).
    """
    n = _count(images, labels, num_images)
    if n < 2:
        raise DataError(f"segment: at least 2 training images are needed, got {n}")
    torch.manual_seed(cfg.seed)
    if model is None:
        model = build_deeplab(num_classes, backbone_weights, cfg.output_stride)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    batch_size = min(cfg.batch_size, n)
    dist.check_divisible(batch_size, "segment.batch_size", min_part=2)
    net = dist.wrap(model, torch.device(device))
    per_epoch = n // batch_size
    total = cfg.epochs * per_epoch
    shuffled = iter_batches(n, batch_size, cfg.epochs, torch.Generator().manual_seed(cfg.seed))
    batches = (b for b in shuffled if len(b[1]) == batch_size)
    loss_sum = 0.0
    for it, (epoch, positions) in enumerate(track(batches, "segment (DeepLabv3)", total=total, disable=not progress)):
        lr = poly_lr(cfg.lr, it, total, cfg.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = lr
        first = dist.part_offset(len(positions))
        rngs = [dist.item_rng(cfg.seed, it, first + k) for k in range(len(dist.part(positions)))]
        x, y = _segmentation_batch(images, labels, dist.part(positions), num_classes, cfg, rngs)
        loss_sum += dist.mean(_sgd_step(net, optimizer, x.to(device), y.to(device), cfg.ohem_fraction, it))
        if (it + 1) % per_epoch == 0:
            if log is not None:
                log({"epoch": epoch, "loss": loss_sum / per_epoch, "lr": lr})
            loss_sum = 0.0
    return model.eval()


def _segmentation_batch(
    images: ImageSource,
    labels: ImageSource,
    positions: list[int],
    num_classes: int,
    cfg: SegmentConfig,
    rngs: list[np.random.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i, rng in zip(positions, rngs):
        label = np.asarray(item(labels, i))
        _check_labels(label, num_classes, i)
        x, y = augment(np.asarray(item(images, i)), label, cfg, rng)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def _sgd_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, fraction: float, it: int
) -> float:
    loss = ohem_cross_entropy(model(x), y, IGNORE_INDEX, fraction)
    if not torch.isfinite(loss):
        raise UsegError(f"segment: the loss became {loss.item()} at iteration {it}; lower segment.lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.item())


@torch.no_grad()
def _probs_at(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) logits -> softmax probabilities float32 (C, H, W) at `size` (bilinear on logits)."""
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    return logits.softmax(0).float().cpu().numpy()


@torch.no_grad()
def predict_segmenter_batch(
    model: nn.Module,
    images: Sequence[np.ndarray],
    size: tuple[int, int] | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> Iterator[np.ndarray]:
    """Class probabilities of each image, in order (see `predict_segmenter`).

    Images are resized to `size` and run `batch_size` at a time; with `size` None, runs of
    consecutive images of one size are batched and the others run alone.
    """
    was_training = model.training
    model.eval()
    try:
        for chunk in _same_size_chunks(images, size, batch_size):
            x = torch.stack([preprocess(im, size or im.shape[:2]) for im in chunk]).to(device)
            for im, logits in zip(chunk, model(x)):
                yield _probs_at(logits, im.shape[:2])
    finally:
        model.train(was_training)


def _same_size_chunks(
    images: Sequence[np.ndarray], size: tuple[int, int] | None, batch_size: int
) -> Iterator[list[np.ndarray]]:
    chunk: list[np.ndarray] = []
    for im in images:
        if chunk and (len(chunk) == batch_size or (size is None and im.shape[:2] != chunk[0].shape[:2])):
            yield chunk
            chunk = []
        chunk.append(im)
    if chunk:
        yield chunk


def predict_segmenter(
    model: nn.Module, image: np.ndarray, size: tuple[int, int] | None = None, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Softmax class probabilities float32 (C, H, W) of one image at its original size.

    Args:
        model: A segmenter from `train_segmenter` / `build_deeplab`.
        image: uint8 RGB (H, W, 3).
        size: Network input size (h, w) the image is resized to; None = as is.
        device: Where the model lives.
    """
    return next(predict_segmenter_batch(model, [image], size, 1, device))

