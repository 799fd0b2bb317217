"""MaskDistill's initial model: a Mask R-CNN trained on clustered masks, and the filter.

MaskDistill (Van Gansbeke et al. 2022) trains a detectron2 Mask R-CNN (ResNet-50-FPN) on
the object masks mined from a self-supervised ViT, each labelled with its K-means cluster
id. The trained model then predicts instances on the same images; the confident ones are
pasted into semantic label maps that supervise the final segmenter (`filter_and_paste`).

Here the detector is torchvision's `MaskRCNN` over a MobileNetV2-FPN backbone (ImageNet
weights or random init), sized for small images on a CPU: FPN levels at strides 8, 16, 32
(+ max-pool level 64), one anchor size per level scaled with `min_size`, frozen batch norm
in the backbone (torchvision's detection default, right for batches of a few images).

Class ids: pseudo-class k (0-based cluster id) is detector class k + 1; 0 is background.
Label maps from `filter_and_paste` use the same ids (0 = background, 1..K = clusters).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline import dist
from pipeline.sections import DistillConfig  # noqa: F401  (the params section, torch-free; re-exported)
from pipeline.errors import DataError, UsegError
from pipeline.models.checkpoints import load_checkpoint_into
from pipeline.progress import track

ImageSource = Union[Sequence[np.ndarray], Callable[[int], np.ndarray]]
"""uint8 RGB images (H, W, 3): a sequence, or a loader called with the image position."""

MaskTarget = tuple[np.ndarray, int]
"""One pseudo-label instance: bool mask (H, W) and its class id (>= 1, 0 = background)."""

Detection = tuple[np.ndarray, float, int]
"""One predicted instance: mask probabilities float (H, W) or bool mask, score, class id (>= 1)."""

# First block of each MobileNetV2 stride stage (torchvision's `_mobilenet_extractor`
# stage indices): a stem conv, then blocks that halve the resolution, then the 1x1 conv.
MOBILENET_V2_STAGES = (0, 2, 4, 7, 14, 18)
# FPN inputs: the last block of the stride-8, stride-16 and stride-32 stages.
FPN_RETURN_LAYERS = {"6": "0", "13": "1", "18": "2"}
FPN_IN_CHANNELS = [32, 96, 1280]
FPN_FEATURE_NAMES = ["0", "1", "2"]


def item(source: ImageSource, index: int) -> np.ndarray:
    """Element `index` of a sequence or of a loader callable."""
    return source(index) if callable(source) else source[index]


def mobilenet_v2_features(
    backbone_weights: Path | None, norm_layer: Callable[[int], nn.Module] | None = None
) -> nn.Sequential:
    """torchvision MobileNetV2 `features` (19 modules), ImageNet weights or random init.

    Args:
        backbone_weights: A torchvision `mobilenet_v2` state dict (e.g.
            `models/weights/mobilenet_v2_imagenet.pt`); None keeps the random init.
        norm_layer: Batch-norm class, e.g. `FrozenBatchNorm2d` for detection; None = BatchNorm2d.

    Raises:
        WeightsError: The checkpoint is missing, unreadable or of another layout.
    """
    net = torchvision.models.mobilenet_v2(weights=None, norm_layer=norm_layer)
    if backbone_weights is not None:
        load_checkpoint_into(net, backbone_weights)
    return net.features


def freeze_stages(features: nn.Sequential, trainable_layers: int) -> None:
    """Freeze all but the last `trainable_layers` of the 6 MobileNetV2 stages (0 = all frozen)."""
    if not 0 <= trainable_layers <= len(MOBILENET_V2_STAGES):
        raise ValueError(f"trainable_layers must be in [0, {len(MOBILENET_V2_STAGES)}], got {trainable_layers}")
    n = len(MOBILENET_V2_STAGES)
    freeze_before = len(features) if trainable_layers == 0 else MOBILENET_V2_STAGES[n - trainable_layers]
    for module in list(features)[:freeze_before]:
        module.requires_grad_(False)


def default_anchor_sizes(min_size: int) -> tuple[tuple[int, ...], ...]:
    """One anchor size per FPN level: 16, 32, 64, 128 px at `min_size` 224, scaled linearly."""
    scale = min_size / 224.0
    return tuple((max(4, round(s * scale)),) for s in (16, 32, 64, 128))


def build_maskrcnn(
    num_classes: int,
    backbone_weights: Path | None,
    min_size: int = 224,
    max_size: int = 448,
    trainable_layers: int = 3,
    fpn_channels: int = 128,
    anchor_sizes: tuple[tuple[int, ...], ...] | None = None,
    box_head_dim: int = 1024,
    box_batch_size_per_image: int = 128,
    rpn_post_nms_top_n_train: int = 1000,
    rpn_post_nms_top_n_test: int = 300,
    detections_per_img: int = 30,
) -> MaskRCNN:
    """Mask R-CNN with a MobileNetV2-FPN backbone.

    Args:
        num_classes: Number of pseudo-classes K, background excluded (the model has K + 1).
        backbone_weights: torchvision MobileNetV2 ImageNet state dict, or None (random init).
        min_size: Shorter image side after the model's internal resize.
        max_size: Longer side cap after that resize.
        trainable_layers: MobileNetV2 stages trained, counted from the top (0-6).
        fpn_channels: FPN width; also the width of the mask head's four convs.
        anchor_sizes: One tuple per FPN level (4 levels); None = `default_anchor_sizes`.
        box_head_dim: Width of the two-layer box head (torchvision: 1024).
        box_batch_size_per_image: RoIs sampled per image for the box head, a quarter of
            them positive (detectron2: 512; images here hold a few objects).
        rpn_post_nms_top_n_train: Proposals kept per image in training.
        rpn_post_nms_top_n_test: Proposals kept per image at inference (torchvision: 1000;
            the box head runs on each, so this dominates prediction time on a CPU).
        detections_per_img: Most detections returned per image (torchvision: 100); the
            mask head and the mask pasting run on each.

    Returns:
        A torchvision `MaskRCNN` in train mode; it normalises with ImageNet mean and std
        itself and takes float RGB images in [0, 1].
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    features = mobilenet_v2_features(backbone_weights, FrozenBatchNorm2d)
    freeze_stages(features, trainable_layers)
    backbone = BackboneWithFPN(
        features, FPN_RETURN_LAYERS, FPN_IN_CHANNELS, fpn_channels, extra_blocks=LastLevelMaxPool()
    )
    sizes = anchor_sizes or default_anchor_sizes(min_size)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return MaskRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=max(1000, rpn_post_nms_top_n_test),
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        box_detections_per_img=detections_per_img,
        box_batch_size_per_image=box_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(FPN_FEATURE_NAMES, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_dim),
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
        mask_roi_pool=MultiScaleRoIAlign(FPN_FEATURE_NAMES, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(fpn_channels, (fpn_channels,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1),
    )


def maskrcnn_from_config(num_classes: int, cfg: DistillConfig, backbone_weights: Path | None = None) -> MaskRCNN:
    """`build_maskrcnn` with the architecture of `cfg` (also to rebuild a saved model before
    `load_state_dict`: pass `backbone_weights=None` there)."""
    return build_maskrcnn(
        num_classes,
        backbone_weights,
        cfg.min_size,
        cfg.max_size,
        trainable_layers=cfg.trainable_layers,
        fpn_channels=cfg.fpn_channels,
        box_batch_size_per_image=cfg.rois_per_image,
    )


def lr_at(iteration: int, total: int, cfg: DistillConfig) -> float:
    """Learning rate of one iteration: linear warm-up from lr/1000, then step decay."""
    lr = cfg.lr * 0.1 ** sum(iteration >= s * total for s in cfg.lr_steps)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        lr *= 0.001 * (1 - alpha) + alpha
    return lr


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> float (3, H, W) in [0, 1], the input torchvision detectors take."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight boxes (N, 4) x0, y0, x1, y1 (exclusive ends) of non-empty bool masks (N, H, W)."""
    out = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        out[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return out


def detection_target(instances: Sequence[MaskTarget], shape: tuple[int, int], flip: bool) -> dict[str, torch.Tensor]:
    """torchvision target dict (boxes, labels, masks) of one image's non-empty instances."""
    kept = [(np.asarray(m, bool), int(c)) for m, c in instances if np.asarray(m).any()]
    for m, c in kept:
        if m.shape != shape:
            raise DataError(f"instance mask of shape {m.shape} does not match image {shape}")
        if c < 1:
            raise DataError(f"instance class id {c}: must be >= 1 (0 is background)")
    masks = np.stack([m for m, _ in kept]).reshape(len(kept), *shape)
    if flip:
        masks = masks[:, :, ::-1]
    masks = np.ascontiguousarray(masks)
    return {
        "boxes": torch.from_numpy(boxes_from_masks(masks)),
        "labels": torch.tensor([c for _, c in kept], dtype=torch.int64),
        "masks": torch.from_numpy(masks.astype(np.uint8)),
    }


def has_instances(instances: Sequence[MaskTarget]) -> bool:
    """True when at least one mask of the image is non-empty."""
    return any(np.asarray(m).any() for m, _ in instances)


def iter_batches(
    num_items: int, batch_size: int, epochs: int, generator: torch.Generator
) -> Iterator[tuple[int, list[int]]]:
    """(epoch, positions) for each batch: a fresh shuffle per epoch, last batch kept."""
    for epoch in range(epochs):
        order = torch.randperm(num_items, generator=generator).tolist()
        for start in range(0, num_items, batch_size):
            yield epoch, order[start : start + batch_size]


def _mean_logs(sums: dict[str, float], count: int) -> dict[str, float]:
    return {k: v / max(count, 1) for k, v in sums.items()}


def train_maskrcnn(
    images: ImageSource,
    targets: Sequence[Sequence[MaskTarget]],
    cfg: DistillConfig,
    backbone_weights: Path | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    device: torch.device | str = "cpu",
) -> MaskRCNN:
    """Train the initial Mask R-CNN on pseudo-labelled masks.

    Images whose masks are all empty are skipped (there is nothing to learn from them);
    their number is in every log record as `images_skipped`.

    Args:
        images: uint8 RGB images (H, W, 3), as a sequence or a loader `f(position)`.
        targets: Per image, its instances: (bool mask (H, W), class id >= 1).
        cfg: Training configuration.
        backbone_weights: MobileNetV2 ImageNet state dict, or None (random init).
        num_classes: K (background excluded); None = the largest class id in `targets`.
        progress: Show a progress bar over iterations.
        log: Called once per epoch with {"epoch", "loss", "loss_<part>"..., "lr",
            "images_used", "images_skipped"}.
        device: Where to train.

    Returns:
        The trained model, in eval mode.

    Raises:
        DataError: No image has a non-empty mask, or a mask does not match its image.
        UsegError: The loss became NaN or infinite (lower `lr`).
    """
    usable = [i for i, t in enumerate(targets) if has_instances(t)]
    if not usable:
        raise DataError(f"distill: none of the {len(targets)} images has a non-empty mask to train on")
    k = num_classes or max(int(c) for t in targets for _, c in t)
    torch.manual_seed(cfg.seed)
    model = maskrcnn_from_config(k, cfg, backbone_weights).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    ranks = dist.world().size
    if ranks > 1:  # equal parts of full batches only: a rank with no image cannot join the gradient average
        dist.check_divisible(cfg.batch_size, "distill.batch_size")
    per_epoch = len(usable) // cfg.batch_size if ranks > 1 else math.ceil(len(usable) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    batches = (b for b in iter_batches(len(usable), cfg.batch_size, cfg.epochs, generator)
               if ranks == 1 or len(b[1]) == cfg.batch_size)
    net = dist.wrap(model, torch.device(device), find_unused_parameters=True)
    sums: dict[str, float] = {}
    for it, (epoch, positions) in enumerate(track(batches, "distill (Mask R-CNN)", total=total, disable=not progress)):
        lr = lr_at(it, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        first = dist.part_offset(len(positions))
        mine = [usable[p] for p in dist.part(positions)]
        rngs = [dist.item_rng(cfg.seed, it, first + k) for k in range(len(mine))]
        xs, ys = _detection_batch(images, targets, mine, cfg.hflip, rngs, device)
        parts = _step(net, optimizer, params, xs, ys, cfg.clip_grad_norm, it)
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + dist.mean(value)
        if (it + 1) % per_epoch == 0:
            record = {"epoch": epoch, **_mean_logs(sums, per_epoch), "lr": lr}
            record.update(images_used=len(usable), images_skipped=len(targets) - len(usable))
            if log is not None:
                log(record)
            sums = {}
    return model.eval()


def _detection_batch(
    images: ImageSource,
    targets: Sequence[Sequence[MaskTarget]],
    indices: list[int],
    hflip: bool,
    rngs: list[np.random.Generator],
    device: torch.device | str,
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    xs, ys = [], []
    for i, rng in zip(indices, rngs):
        image = item(images, i)
        flip = bool(hflip and rng.random() < 0.5)
        x = image_tensor(image)
        xs.append((x.flip(-1) if flip else x).to(device))
        y = detection_target(targets[i], image.shape[:2], flip)
        ys.append({k: v.to(device) for k, v in y.items()})
    return xs, ys


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    xs: list[torch.Tensor],
    ys: list[dict[str, torch.Tensor]],
    clip: float,
    iteration: int,
) -> dict[str, float]:
    """One SGD step; returns the loss and its parts as floats."""
    parts = model(xs, ys)
    loss = sum(parts.values())
    if not torch.isfinite(loss):
        raise UsegError(f"distill: the loss became {loss.item()} at iteration {iteration}; lower distill.lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    return {"loss": float(loss.item()), **{k: float(v.item()) for k, v in parts.items()}}


@torch.no_grad()
def predict_instances_batch(
    model: MaskRCNN, images: Sequence[np.ndarray], score_floor: float = 0.0, device: torch.device | str = "cpu"
) -> list[list[Detection]]:
    """Instances of several images (see `predict_instances`); images may differ in size."""
    was_training, old_thresh = model.training, model.roi_heads.score_thresh
    model.eval()
    model.roi_heads.score_thresh = score_floor
    try:
        outputs = model([image_tensor(im).to(device) for im in images])
    finally:
        model.roi_heads.score_thresh = old_thresh
        model.train(was_training)
    return [_detections(out) for out in outputs]


def _detections(output: dict[str, torch.Tensor]) -> list[Detection]:
    masks = output["masks"][:, 0].float().cpu().numpy()
    scores = output["scores"].cpu().tolist()
    labels = output["labels"].cpu().tolist()
    return [(masks[i], float(scores[i]), int(labels[i])) for i in range(len(scores))]


def predict_instances(
    model: MaskRCNN, image: np.ndarray, score_floor: float = 0.0, device: torch.device | str = "cpu"
) -> list[Detection]:
    """Predicted instances of one image at its original size, best score first.

    Args:
        model: A Mask R-CNN from `train_maskrcnn` / `build_maskrcnn`.
        image: uint8 RGB (H, W, 3).
        score_floor: Detections scoring at or below this are dropped (torchvision's
            `box_score_thresh`, temporarily replaced); 0 keeps all (up to 100 per image).
        device: Where the model lives.

    Returns:
        [(mask probabilities float32 (H, W), score, class id >= 1)], sorted by score.
    """
    return predict_instances_batch(model, [image], score_floor, device)[0]


def select_confident(detections: Sequence[Detection], score_threshold: float = 0.9, min_keep: int = 1) -> list[Detection]:
    """MaskDistill's selection: detections with score >= threshold, best first; if none
    reaches it, only the single best detection (so every image with a detection keeps one).

    `min_keep` > 1 generalises the fallback (our scene-centric extension): when fewer than
    `min_keep` detections reach the threshold, the `min_keep` best are kept. 1 = the paper.
    """
    ranked = sorted(detections, key=lambda d: -d[1])
    kept = [d for d in ranked if d[1] >= score_threshold]
    return kept if len(kept) >= min_keep else ranked[:min_keep]


def binary_mask(mask: np.ndarray, mask_threshold: float) -> np.ndarray:
    """bool mask: as is when bool, else probabilities >= threshold (detectron2's binarisation)."""
    return mask if mask.dtype == bool else mask >= mask_threshold


def filter_and_paste(
    detections: Sequence[Detection],
    height: int,
    width: int,
    score_threshold: float = 0.9,
    mask_threshold: float = 0.5,
    dtype: type = np.uint8,
    min_keep: int = 1,
) -> np.ndarray:
    """MaskDistill's filter: confident detections pasted into a semantic label map.

    Follows the official `gen_segmentation.py`: `select_confident`, then masks are pasted
    in descending score order and a mask that overlaps any already pasted pixel is
    skipped as a whole (its non-overlapping pixels are not pasted either). The official
    overlap test indexes the canvas with the uint8 mask (`mask_res[mask].any()`), which
    NumPy reads as row indices 0/1 rather than a boolean mask; this implements the
    evident intent (a boolean overlap test), not that slip.

    Args:
        detections: (mask probabilities (H, W) or bool mask, score, class id >= 1).
        height: Label map height.
        width: Label map width.
        score_threshold: Minimum score kept (>=).
        min_keep: Fewer than this many confident detections: the `min_keep` best instead (1 = the paper).
        mask_threshold: Binarisation threshold for probability masks (>=).
        dtype: Label map dtype; its largest value is reserved (255 = ignore for uint8).

    Returns:
        Label map (height, width): 0 = background, class id where a mask was pasted.

    Raises:
        ValueError: A mask of the wrong shape or a class id that `dtype` cannot hold.
    """
    canvas = np.zeros((height, width), dtype)
    limit = np.iinfo(dtype).max
    for mask, _, class_id in select_confident(detections, score_threshold, min_keep):
        m = binary_mask(np.asarray(mask), mask_threshold)
        if m.shape != (height, width):
            raise ValueError(f"mask of shape {m.shape} does not match the label map ({height}, {width})")
        if not 1 <= class_id < limit:
            raise ValueError(f"class id {class_id} outside [1, {limit - 1}] for {np.dtype(dtype).name} label maps")
        if canvas[m].any():
            continue
        canvas[m] = class_id
    return canvas
