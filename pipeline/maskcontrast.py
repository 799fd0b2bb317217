"""MaskContrast (Van Gansbeke et al., ICCV 2021): pixel embeddings trained with a mask-level
contrastive loss on saliency masks.

What the official code does, and what this module does alike:

- Model: a DeepLabv3 head (ASPP) on a dilated trunk, ending in a 32-d pixel embedding and a
  1-channel saliency logit, both upsampled to the input. The official trunk is a MoCo v2
  ResNet-50; here it is MobileNetV2 (ImageNet-supervised) at output stride 16, the same trunk
  as the MaskDistill segmenter (`pipeline.segmenter.build_deeplab` with 32 + 1 outputs).
- Data: two views of each image, each RandomResizedCrop(224, scale 0.2-1) + horizontal flip
  applied to the image and its saliency mask alike, then ColorJitter(0.4, 0.4, 0.4, 0.1) with
  p 0.8 and grayscale with p 0.2 on the image. A view whose salient area is outside 1-99% of
  the crop is re-drawn (3 tries; then the image is replaced by another one).
- Loss: a momentum copy of the model (m = 0.999) embeds the key view; the L2-normalised
  embeddings under its saliency mask are summed and L2-normalised into one prototype per image.
  Every salient pixel of the query view (its L2-normalised embedding) is classified against
  [the batch's prototypes, a queue of past prototypes] with temperature 0.5; the target is its
  own image's prototype. The cross-entropy is weighted per target with the ENet weights
  w = 1 / ln(1.02 + p), p the share of the pixels that target holds. Plus the balanced binary
  cross-entropy of the saliency logits against the query view's mask.
- Ablations of the paper: `views: false` uses one view for query and key, `queue_size: 0`
  keeps only the batch's prototypes as negatives, `momentum_encoder: false` computes the
  prototypes with the query model itself (no gradient through them).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from pipeline import dist
from pipeline.sections import ContrastConfig  # noqa: F401  (the params section, torch-free; re-exported)
from pipeline.errors import DataError, UsegError
from pipeline.features import IMAGENET_MEAN, IMAGENET_STD, preprocess
from pipeline.progress import track
from pipeline.segmenter import ATROUS_RATES, DeepLabV3, build_deeplab, poly_lr

EMBED_DIM = 32


class FrozenViTTrunk(nn.Module):
    """A frozen ViT whose last-layer patch tokens, as a (B, D, h, w) map, feed the ASPP head."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        for p in self.vit.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenViTTrunk:
        super().train(mode)
        self.vit.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.vit(x)
        h, w = out.grid
        return out.patch_tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)


class ContrastModel(nn.Module):
    """DeepLabv3 with EMBED_DIM + 1 outputs: the pixel embedding and the saliency logit."""

    def __init__(self, deeplab: DeepLabV3) -> None:
        super().__init__()
        self.deeplab = deeplab

    def forward_lowres(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> embeddings (B, D, h, w) and saliency logits (B, h, w) at the head's stride."""
        out = self.deeplab.head(self.deeplab.backbone(x))
        return out[:, :EMBED_DIM], out[:, EMBED_DIM]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> embeddings (B, D, H, W) and saliency logits (B, H, W), bilinear to the input."""
        out = self.deeplab(x)
        return out[:, :EMBED_DIM], out[:, EMBED_DIM]


def build_contrast_model(
    backbone_weights: Path | None, output_stride: int = 16, vit: nn.Module | None = None
) -> ContrastModel:
    """MaskContrast's model.

    Args:
        backbone_weights: MobileNetV2 ImageNet state dict for the default trunk, or None (random).
        output_stride: 16 or 8 (MobileNetV2 trunk only).
        vit: A `pipeline.models.backbones` ViT: when given, its frozen patch tokens are the
            trunk (`contrast.backbone: features`) and only the ASPP head trains.
    """
    if vit is None:
        return ContrastModel(build_deeplab(EMBED_DIM + 1, backbone_weights, output_stride))
    head_rates = ATROUS_RATES[16]  # a ViT-S/14 grid is close to stride 16
    return ContrastModel(DeepLabV3(FrozenViTTrunk(vit), vit.embed_dim, EMBED_DIM + 1, head_rates))


# ----------------------------------------------------------------------------------- losses


def enet_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """ENet class weights 1 / ln(1.02 + p_c), p_c = share of `labels` equal to c."""
    p = torch.bincount(labels, minlength=num_classes).float() / max(1, labels.numel())
    return 1.0 / torch.log(1.02 + p)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Balanced binary cross-entropy (MaskContrast's saliency loss).

    Positives are weighted by the share of negatives and vice versa, summed over all pixels
    and divided by their number.
    """
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    n = target.numel()
    pos = target.sum()
    w = (n - pos) / n
    return (w * (bce * target).sum() + (1 - w) * (bce * (1 - target)).sum()) / n


def key_prototypes(key_emb: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """One prototype per image: L2-normalised sum of the normalised key embeddings in its mask.

    Args:
        key_emb: (B, D, H, W) L2-normalised key embeddings.
        key_mask: (B, H, W) bool saliency masks of the key views.
    """
    m = key_mask.to(key_emb.dtype).flatten(1)  # (B, HW)
    summed = torch.bmm(key_emb.flatten(2), m[:, :, None])[:, :, 0]  # (B, D)
    return F.normalize(summed, dim=1)


def contrastive_logits(
    query_emb: torch.Tensor, query_mask: torch.Tensor, prototypes: torch.Tensor, queue: torch.Tensor, temperature: float,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every salient query pixel against [batch prototypes, queue], and its target.

    Args:
        query_emb: (B, D, H, W) L2-normalised query embeddings.
        query_mask: (B, H, W) bool saliency masks of the query views.
        prototypes: (B, D) key prototypes of the batch.
        queue: (Q, D) past prototypes (Q may be 0).
        temperature: Softmax temperature.
        offset: Row of `prototypes` that belongs to the first query image (a DDP rank's
            share of a batch whose prototypes were gathered from every rank).

    Returns:
        logits (M, B + Q) and targets (M,) = the image index of each of the M salient pixels.
    """
    d = query_emb.shape[1]
    pix = query_emb.permute(0, 2, 3, 1)[query_mask]  # (M, D), image-major order
    target = torch.nonzero(query_mask)[:, 0] + offset
    bank = torch.cat([prototypes, queue.to(prototypes.dtype)], 0) if queue.numel() else prototypes
    logits = pix.reshape(-1, d) @ bank.t() / temperature
    return logits, target


def contrastive_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the pixel logits with the ENet weights of the targets."""
    return F.cross_entropy(logits.float(), target, weight=enet_weights(target, logits.shape[1]))


class PrototypeQueue:
    """A FIFO of past key prototypes (MoCo's queue), L2-normalised random entries at start."""

    def __init__(self, size: int, dim: int, generator: torch.Generator) -> None:
        self.entries = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.ptr = 0

    def push(self, prototypes: torch.Tensor) -> None:
        n = self.entries.shape[0]
        if n == 0:
            return
        b = prototypes.shape[0]
        if n % b:
            raise ValueError(f"queue size {n} is not a multiple of the batch {b}")
        self.entries[self.ptr : self.ptr + b] = prototypes.detach().to(self.entries.dtype).cpu()
        self.ptr = (self.ptr + b) % n


@torch.no_grad()
def momentum_update(key_model: nn.Module, query_model: nn.Module, m: float) -> None:
    """key = m * key + (1 - m) * query, parameters only (buffers are copied)."""
    for pk, pq in zip(key_model.parameters(), query_model.parameters()):
        pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)
    for bk, bq in zip(key_model.buffers(), query_model.buffers()):
        bk.copy_(bq)


# ------------------------------------------------------------------------------------ views


def _view_transforms(cfg: ContrastConfig) -> tuple[v2.Transform, v2.Transform]:
    geometric = v2.Compose([
        v2.RandomResizedCrop(cfg.crop_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ])
    photometric = v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ])
    return geometric, photometric


class ViewSampler:
    """Draws (query, key) views of an image and its saliency mask, with MaskContrast's re-draws."""

    TRIES = 3

    def __init__(self, cfg: ContrastConfig) -> None:
        self.cfg = cfg
        self.geometric, self.photometric = _view_transforms(cfg)

    def one_view(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A view whose salient share is within [min_salient, max_salient], or None after 3 tries."""
        for _ in range(self.TRIES):
            img, m = self.geometric(tv_tensors.Image(image), tv_tensors.Mask(mask))
            share = float(m.float().mean())
            if self.cfg.min_salient <= share <= self.cfg.max_salient:
                img = self.photometric(img)
                x = (img.as_subclass(torch.Tensor).float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
                return x, m.as_subclass(torch.Tensor).bool()
        return None

    def pair(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, ...] | None:
        """(query image, query mask, key image, key mask), or None when no valid view was found."""
        if mask.shape != image.shape[:2]:
            raise DataError(f"saliency mask of shape {mask.shape} does not match its image {image.shape[:2]}")
        img = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        msk = torch.from_numpy(mask.astype(np.uint8))
        q = self.one_view(img, msk)
        if q is None:
            return None
        if not self.cfg.views:
            return (*q, *q)
        k = self.one_view(img, msk)
        return None if k is None else (*q, *k)


# --------------------------------------------------------------------------------- training


def train_maskcontrast(
    load: Callable[[int], tuple[np.ndarray, np.ndarray]],
    num_images: int,
    cfg: ContrastConfig,
    backbone_weights: Path | None = None,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    device: torch.device | str = "cpu",
    vit: nn.Module | None = None,
) -> ContrastModel:
    """Train MaskContrast on images with one saliency mask each.

    Args:
        load: `load(j)` -> (uint8 RGB image (H, W, 3), bool saliency mask (H, W)), j < num_images.
        num_images: Number of training images.
        cfg: Hyperparameters.
        backbone_weights: MobileNetV2 ImageNet state dict, or None (random init).
        progress: Show a progress bar over iterations.
        log: Called once per epoch with {"epoch", "loss", "contrastive", "saliency", "lr", "redrawn"}.
        device: Where to train.
        vit: Frozen ViT trunk instead of MobileNetV2 (see `build_contrast_model`).

    Returns:
        The query model, in eval mode.

    Raises:
        DataError: Fewer than 2 images, or no image gives a valid view.
        UsegError: The loss became NaN or infinite.
    """
    if num_images < 2:
        raise DataError(f"contrast: at least 2 training images with a saliency mask are needed, got {num_images}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_contrast_model(backbone_weights, cfg.output_stride, vit).to(device).train()
    key_model = None
    if cfg.momentum_encoder:
        key_model = copy.deepcopy(model)
        for p in key_model.parameters():
            p.requires_grad_(False)
    queue = PrototypeQueue(cfg.queue_size, EMBED_DIM, gen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sampler = ViewSampler(cfg)
    batch_size = min(cfg.batch_size, num_images)
    dist.check_divisible(batch_size, "contrast.batch_size", min_part=2)
    net = dist.wrap(model, torch.device(device))
    per_epoch = num_images // batch_size
    total = cfg.epochs * per_epoch
    stats = _EpochStats()
    it = 0
    # Every rank draws the views of the whole batch (one random stream, as one process would),
    # then trains on its share; the key prototypes are gathered so that each pixel is
    # classified against the prototypes of the whole batch and the queue.
    for epoch, views in _batches(load, num_images, batch_size, cfg.epochs, sampler, gen, stats, progress):
        lr = poly_lr(cfg.lr, it, total, cfg.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = lr
        xq, mq, xk, mk = (dist.part(v).to(device) for v in views)
        q_emb, q_sal = net(xq)
        q_emb = F.normalize(q_emb, dim=1)
        with torch.no_grad():
            if key_model is not None:
                momentum_update(key_model, model, cfg.key_momentum)
                k_emb = key_model(xk)[0]
            else:
                k_emb = model(xk)[0].detach()
            protos = dist.gather(key_prototypes(F.normalize(k_emb, dim=1), mk))
        logits, target = contrastive_logits(q_emb, mq, protos, queue.entries.to(device), cfg.temperature,
                                            offset=dist.part_offset(batch_size))
        l_con = contrastive_loss(logits, target)
        l_sal = balanced_bce(q_sal, mq)
        loss = l_con + l_sal
        if not torch.isfinite(loss):
            raise UsegError(f"contrast: the loss became {loss.item()} at iteration {it}; lower contrast.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        queue.push(protos)
        stats.add(dist.mean(loss.item()), dist.mean(l_con.item()), dist.mean(l_sal.item()))
        it += 1
        if it % per_epoch == 0 and log is not None:
            log({"epoch": epoch, "lr": lr, **stats.flush()})
    if it == 0:
        raise DataError("contrast: no training batch could be formed (no image gives a view with 1-99% salient area)")
    return model.eval()


class _EpochStats:
    def __init__(self) -> None:
        self.sums = np.zeros(3)
        self.n = 0
        self.redrawn = 0

    def add(self, loss: float, con: float, sal: float) -> None:
        self.sums += (loss, con, sal)
        self.n += 1

    def flush(self) -> dict:
        mean = self.sums / max(1, self.n)
        out = {"loss": mean[0], "contrastive": mean[1], "saliency": mean[2], "replaced_images": self.redrawn}
        self.sums[:] = 0
        self.n = 0
        self.redrawn = 0
        return out


def _batches(
    load: Callable[[int], tuple[np.ndarray, np.ndarray]],
    num_images: int,
    batch_size: int,
    epochs: int,
    sampler: ViewSampler,
    gen: torch.Generator,
    stats: _EpochStats,
    progress: bool = True,
) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
    """Full batches of stacked views, `num_images // batch_size` per epoch, a fresh shuffle each epoch.

    An image with no valid view after 3 tries is replaced by the next image of a random order.
    """
    per_epoch = num_images // batch_size
    bar = track(range(epochs * per_epoch), "contrast (MaskContrast)", total=epochs * per_epoch, disable=not progress)
    steps = iter(bar)
    for epoch in range(epochs):
        order = torch.randperm(num_images, generator=gen).tolist()
        spare = torch.randperm(num_images, generator=gen).tolist()
        cursor = 0
        for b in range(per_epoch):
            views = []
            for j in order[b * batch_size : (b + 1) * batch_size]:
                pair = sampler.pair(*load(j))
                while pair is None:
                    if cursor >= len(spare):
                        raise DataError("contrast: too few images give a view with 1-99% salient area")
                    stats.redrawn += 1
                    pair = sampler.pair(*load(spare[cursor]))
                    cursor += 1
                views.append(pair)
            next(steps, None)
            yield epoch, tuple(torch.stack(v) for v in zip(*views))
    for _ in steps:
        pass


# ------------------------------------------------------------------------------- inference


@torch.no_grad()
def embed_image(
    model: ContrastModel, image: np.ndarray, size: tuple[int, int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the model on one image resized to `size`.

    Returns:
        low-res embeddings (D, h, w) (not normalised), L2-normalised embeddings (D, H, W) and
        saliency probabilities (H, W), the last two at the image's original size.
    """
    x = preprocess(image, size)[None].to(device)
    emb, sal = model.forward_lowres(x)
    hw = image.shape[:2]
    up = F.interpolate(torch.cat([emb, sal[:, None]], 1), size=hw, mode="bilinear", align_corners=False)[0]
    return emb[0].float().cpu(), F.normalize(up[:EMBED_DIM], dim=0).float().cpu(), up[EMBED_DIM].sigmoid().float().cpu()


def saliency_prototype(emb: torch.Tensor, sal: torch.Tensor, threshold: float = 0.5) -> np.ndarray | None:
    """Saliency-weighted mean embedding over the predicted salient pixels (None if there are none)."""
    w = sal * (sal > threshold)
    total = float(w.sum())
    if total <= 0:
        return None
    return (emb.flatten(1) @ w.flatten() / total).numpy()


def region_prototype(emb: torch.Tensor, region: torch.Tensor) -> np.ndarray | None:
    """Mean embedding over a bool region (None if it is empty)."""
    n = int(region.sum())
    if n == 0:
        return None
    return (emb.flatten(1)[:, region.flatten()].sum(1) / n).numpy()


def majority_label(gt: np.ndarray, region: np.ndarray, num_classes: int) -> int:
    """The most frequent GT class inside `region` (ignoring 255); -1 when nothing is labelled."""
    values = gt[region]
    values = values[values < num_classes]
    if values.size == 0:
        return -1
    return int(np.bincount(values, minlength=num_classes).argmax())


def retrieve(queries: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray) -> np.ndarray:
    """Label of the nearest bank entry by cosine similarity, for each query row."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    b = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    return bank_labels[np.argmax(q @ b.T, axis=1)]


def pca_whiten(train: np.ndarray, dims: int, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Fit PCA with whitening on `train`; return x -> L2-normalised whitened projection."""
    from sklearn.decomposition import PCA

    dims = min(dims, train.shape[0], train.shape[1])
    pca = PCA(n_components=dims, whiten=True, random_state=seed).fit(train)

    def apply(x: np.ndarray) -> np.ndarray:
        z = pca.transform(x).astype(np.float32)
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    return apply
