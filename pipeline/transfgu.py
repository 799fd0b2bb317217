"""TransFGU (Yin et al., ECCV 2022): top-down fine-grained unsupervised semantic segmentation.

What the official code (github.com/damo-cv/TransFGU) does, and what this module does alike:

- Concept discovery (`*_crop.py`, `models/utils/bbox_anchors.py`): the last-block CLS attention
  of the frozen ViT, averaged over heads, above its mean is the foreground. Square sliding
  windows of side 0.6, 0.5, 0.4, 0.3 of the grid (COCO-Stuff: 0.5-0.2), stride half a side;
  a window with more than 50% foreground is a "thing" crop, one with more than 80% background
  a "stuff" crop (scene-centric datasets only). Each crop is resized and its CLS token is its
  embedding; things and stuff are clustered separately by K-means into concepts.
- Pseudo-labels (`segmenter_thingstuff.get_grad_mask`): for every concept, the loss
  1 - cos(CLS(image), concept) is back-propagated to the last block's attention; the CLS row
  of that gradient, averaged over heads, gives g; -g clamped at 0 keeps its top 80% of mass
  (`utils/binarize_mask`), the max-normalised CLS attention is added, and the positions where
  g > 0 are zeroed.
- Decoder (`models/mask_transformer/decoder.py`): Segmenter's mask transformer, 2 blocks,
  6 heads, d_model 384, dropout 0.1, K class embeddings, masks = normalised patches @
  normalised classes, LayerNorm over the K classes.
- Losses (`models/loss/BootstrappingLoss.py`, `CLSEmbLoss.py`): the CAMs of a training crop
  are min-max normalised per image (jointly over the concepts), a background channel
  relu(0.1 - max) is put first (object-centric datasets), the target is the arg-max; once
  bootstrapping started, the target is the arg-max of 0.5 softmax(teacher) + 0.5 maps and a
  negative term - alpha CE(target relabelled by a random channel permutation) is added.
  Uncertainty loss 1 - (p1 - p2) over the foreground, class-embedding loss 1 + cos over pairs.
  Total 1 L_cat + 0.3 L_unc + 1 L_emb; Adam lr 1e-4, weight decay 5e-4 (not on biases and
  norms), gradients clamped to +-1.
- Bootstrapping (`*_trainval.py`): from epoch 5, at every teacher update the teacher becomes
  the current student and the student is reset to its initial weights (the optimiser state is
  kept); VOC's update interval is 5,5,5,5,4,4,4,4,4,3 for each block of 10 epochs.
- Augmentation (`Segmenter.data_augment`): a random box of 0.4-1 of the image side, the image
  crop resized bilinearly, the CAM maps cropped with RoIAlign (aligned) onto the crop's token
  grid, a random horizontal flip, plus colour jitter / grayscale / blur on the image.

Deviations, all explicit: K-means is faiss spherical K-means on L2-normalised CLS tokens
(the official uses Euclidean K-means on raw tokens); window sides are rounded and windows
always reach the grid's far edges; the decoder's class embeddings are a (K, d) matrix with
orthonormal rows (the official `orthogonal_` on a (1, K, d) tensor only makes one unit
vector of length K*d).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align
from torchvision.transforms import v2

from pipeline import dist
from pipeline.sections import VOC_UPDATE_INTERVALS, TransFGUConfig  # noqa: F401  (the params section, torch-free; re-exported)
from pipeline.baseline import fit_kmeans, l2_normalize
from pipeline.errors import DataError, ParamsError, UsegError
from pipeline.features import IMAGENET_MEAN, IMAGENET_STD
from pipeline.progress import track

Window = tuple[int, int, int, int]

# ------------------------------------------------------------------------- concept discovery


def foreground_map(cls_attn: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Foreground of the token grid: head-averaged CLS attention above its mean.

    Args:
        cls_attn: (heads, P) or (B, heads, P) last-block CLS-to-patch attention.
        grid: (h, w) with h * w = P.

    Returns:
        bool (h, w), or (B, h, w) for a batch.
    """
    attn = cls_attn.float().mean(-2)  # (..., P)
    fg = attn > attn.mean(-1, keepdim=True)
    return fg.reshape(*fg.shape[:-1], int(grid[0]), int(grid[1]))


def _starts(length: int, side: int, stride: int) -> list[int]:
    starts = list(range(0, length - side + 1, stride))
    if starts[-1] != length - side:
        starts.append(length - side)  # reach the far edge
    return starts


def sliding_windows(grid_h: int, grid_w: int, fractions: Sequence[float] = (0.6, 0.5, 0.4, 0.3)) -> list[Window]:
    """Square windows over a token grid, all fractions, in patch units.

    The side is round(fraction * min(grid_h, grid_w)) (at least 1), the stride half the side
    (at least 1); the last window of each row and column touches the grid's far edge. A side
    given by two fractions is listed once.

    Returns:
        (y0, x0, y1, x1) windows, ends exclusive, by decreasing side, then row-major.
    """
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"empty token grid {grid_h}x{grid_w}")
    windows: list[Window] = []
    sides: list[int] = []
    for fraction in fractions:
        side = min(max(1, round(fraction * min(grid_h, grid_w))), grid_h, grid_w)
        if side in sides:
            continue
        sides.append(side)
        stride = max(1, side // 2)
        for y0 in _starts(grid_h, side, stride):
            for x0 in _starts(grid_w, side, stride):
                windows.append((y0, x0, y0 + side, x0 + side))
    return windows


def select_windows(
    fg: np.ndarray | torch.Tensor,
    windows: Sequence[Window],
    fg_min: float = 0.5,
    bg_min: float = 0.8,
    scene_centric: bool = False,
    every_window: bool = False,
) -> tuple[list[Window], list[Window]]:
    """Thing windows (foreground share > fg_min) and, when scene-centric, stuff windows
    (background share > bg_min); stuff is empty otherwise.

    Args:
        fg: bool (h, w) foreground of the token grid.
        windows: (y0, x0, y1, x1) windows in patch units.
        every_window: Every window is a concept crop, no attention filter, no stuff list
            (the official Cityscapes recipe, `cityscapes_crop.py`).
    """
    if every_window:
        return list(windows), []
    fg = np.asarray(fg.cpu() if isinstance(fg, torch.Tensor) else fg, dtype=bool)
    things: list[Window] = []
    stuff: list[Window] = []
    for win in windows:
        y0, x0, y1, x1 = win
        share = float(fg[y0:y1, x0:x1].mean())
        if share > fg_min:
            things.append(win)
        if scene_centric and 1.0 - share > bg_min:
            stuff.append(win)
    return things, stuff


def crop_for_window(
    image: torch.Tensor, window: Window, grid: Sequence[int], patch: int, out_size: int | Sequence[int]
) -> torch.Tensor:
    """The image under a window, resized bilinearly to `out_size` (a multiple of the patch).

    Args:
        image: (3, H, W) ImageNet-normalised image the backbone saw, H >= grid_h * patch.
        window: (y0, x0, y1, x1) in patch units.
        grid: (h, w) token grid of the image.
        patch: Patch size in pixels.
        out_size: Side (or (height, width)) of the crop fed to the backbone.

    Returns:
        (3, out_h, out_w) crop; the backbone's CLS token on it is the window's embedding.
    """
    out_hw = (out_size, out_size) if isinstance(out_size, int) else tuple(int(v) for v in out_size)
    if out_hw[0] % patch or out_hw[1] % patch:
        raise ValueError(f"crop size {out_hw} is not a multiple of the patch size {patch}")
    y0, x0, y1, x1 = window
    if not (0 <= y0 < y1 <= grid[0] and 0 <= x0 < x1 <= grid[1]):
        raise ValueError(f"window {window} is outside the {grid[0]}x{grid[1]} grid")
    crop = image[:, y0 * patch : y1 * patch, x0 * patch : x1 * patch]
    return F.interpolate(crop[None].float(), size=out_hw, mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def window_embeddings(backbone: nn.Module, x: torch.Tensor, cfg: TransFGUConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS tokens of one image's thing and stuff windows (the concept-discovery crops).

    Args:
        backbone: A ViT `Backbone` (CLS token and CLS attention).
        x: (1, 3, H, W) ImageNet-normalised image.
        cfg: Window fractions, thresholds, crop size, scene_centric.

    Returns:
        things (n, D) and stuff (m, D) float CLS tokens (either may have 0 rows).
    """
    out = backbone(x)
    grid = out.grid
    fg = foreground_map(out.cls_attn[0], grid)
    things, stuff = select_windows(
        fg,
        sliding_windows(grid[0], grid[1], cfg.window_fractions),
        cfg.fg_min,
        cfg.bg_min,
        cfg.scene_centric,
        every_window=cfg.windows == "all",
    )
    dim = out.cls.shape[-1]

    def embed(windows: list[Window]) -> torch.Tensor:
        if not windows:
            return torch.zeros(0, dim)
        feats = []
        for start in range(0, len(windows), 32):
            chunk = windows[start : start + 32]
            crops = torch.stack([crop_for_window(x[0], w, grid, backbone.patch_size, cfg.crop_size) for w in chunk])
            feats.append(backbone(crops).cls.float().cpu())
        return torch.cat(feats)

    return embed(things), embed(stuff)


def discover_concepts(embeddings: np.ndarray, k: int, iters: int = 100, seed: int = 0) -> np.ndarray:
    """Concepts: faiss spherical K-means on the L2-normalised crop CLS tokens.

    Things and stuff are clustered separately by the caller.

    Returns:
        (k, D) float32 unit-norm centroids.

    Raises:
        DataError: Fewer crops than concepts.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < k:
        raise DataError(f"transfgu: {k} concepts need at least {k} window crops, got {x.shape[0] if x.ndim else 0}")
    return fit_kmeans(l2_normalize(x), k, iters, seed, spherical=True)


# ------------------------------------------------------------------------ CAM pseudo-labels


def keep_top_mass(values: torch.Tensor, mass: float = 0.8) -> torch.Tensor:
    """Bool mask of the largest values that together first reach `mass` of the total.

    Values are sorted in decreasing order and the smallest prefix whose cumulative sum
    reaches `mass` * total is kept (the official `binarize_mask`); zeros are never kept.

    Args:
        values: (..., N) non-negative values; the mask is computed over the last axis.
    """
    sorted_vals, order = values.sort(dim=-1, descending=True)
    total = sorted_vals.sum(-1, keepdim=True)
    before = sorted_vals.cumsum(-1) - sorted_vals  # mass strictly before each position
    keep_sorted = (before < mass * total) & (sorted_vals > 0)
    keep = torch.zeros_like(keep_sorted)
    return keep.scatter(-1, order, keep_sorted)


def concept_cams(
    backbone: nn.Module, x: torch.Tensor, concepts: torch.Tensor, mass: float = 0.8, batch: int = 8
) -> torch.Tensor:
    """Class-activation maps of every concept on one image (TransFGU's pseudo-labels).

    For concept c, g = d(1 - cos(CLS(x), c)) / d(last-block attention), CLS row to the
    patches, averaged over heads. cam = the part of clamp(-g, 0) holding its top `mass`
    (`keep_top_mass`) + the max-normalised head-averaged CLS attention, zeroed where g > 0.

    One forward pass; the gradients of all concepts come from batched vector-Jacobian
    products w.r.t. the attention only (`batch` concepts at a time), so no gradient reaches
    the backbone's parameters.

    Args:
        backbone: A ViT `Backbone` whose `last_attn` is the last block's softmax attention.
        x: (1, 3, H, W) ImageNet-normalised image.
        concepts: (C, D) concept embeddings (need not be normalised).

    Returns:
        (C, h, w) float maps on the token grid.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"concept_cams takes one image (1, 3, H, W), got {tuple(x.shape)}")
    with torch.enable_grad():
        xin = x.detach().clone().requires_grad_(True)  # puts the attention in the graph even if the backbone is frozen
        out = backbone(xin)
        attn = backbone.last_attn
        if attn is None or not attn.requires_grad:
            raise ValueError("concept_cams needs a ViT backbone that keeps its last attention in the graph")
        h, w = out.grid
        concepts = concepts.to(out.cls.device, out.cls.dtype)
        losses = 1.0 - F.cosine_similarity(out.cls, concepts, dim=1)  # (C,)
        grads = []
        for start in range(0, concepts.shape[0], batch):
            n = min(batch, concepts.shape[0] - start)
            eye = torch.zeros(n, concepts.shape[0], device=losses.device, dtype=losses.dtype)
            eye[torch.arange(n), start + torch.arange(n)] = 1.0
            last = start + n >= concepts.shape[0]
            (g,) = torch.autograd.grad(losses, attn, grad_outputs=eye, retain_graph=not last, is_grads_batched=True)
            grads.append(g[:, 0, :, 0, 1:].mean(1).float())  # (n, P): CLS row to patches, head mean
    g = torch.cat(grads).detach()
    cls_attn = attn.detach()[0, :, 0, 1:].float().mean(0)  # (P,)
    attn_norm = cls_attn / cls_attn.max()
    neg = (-g).clamp(min=0)
    kept = neg * keep_top_mass(neg, mass)
    cam = attn_norm[None] + kept
    cam = cam.masked_fill(g > 0, 0.0)
    return cam.reshape(-1, h, w)


# ------------------------------------------------------------------------------------ decoder


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class _Block(nn.Module):
    """Pre-norm transformer block with dropout (DINO's Block, as the official decoder uses)."""

    def __init__(self, dim: int, heads: int, dropout: float, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer (Strudel et al. 2021) as TransFGU uses it.

    Patch tokens are projected to d_model and concatenated with K learnable class
    embeddings (orthonormal rows at init); after the blocks and a LayerNorm, patches and
    classes are projected, L2-normalised, and their products, LayerNorm-ed over K, are the
    mask logits on the token grid.
    """

    def __init__(
        self, in_dim: int, num_classes: int, d_model: int = 384, depth: int = 2, heads: int = 6, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        self.num_classes = num_classes
        scale = d_model**-0.5
        self.proj_dec = nn.Linear(in_dim, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads, dropout) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.cls_emb = nn.Parameter(torch.empty(num_classes, d_model))
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.orthogonal_(self.cls_emb)

    def forward(self, tokens: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, in_dim) patch tokens -> logits (B, K, h, w) and unit class features (B, K, d_model)."""
        b, p, _ = tokens.shape
        h, w = int(grid[0]), int(grid[1])
        if h * w != p:
            raise ValueError(f"{p} tokens do not fill a {h}x{w} grid")
        x = torch.cat([self.proj_dec(tokens), self.cls_emb.expand(b, -1, -1).to(tokens.dtype)], 1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :p] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, p:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, P, K)
        return masks.transpose(1, 2).reshape(b, self.num_classes, h, w), classes


def upsample(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, K, h, w) -> (B, K, H, W), bilinear (align_corners=False)."""
    return F.interpolate(logits, size=tuple(int(v) for v in size), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict(
    decoder: MaskTransformerDecoder, tokens: torch.Tensor, grid: Sequence[int], size: Sequence[int]
) -> torch.Tensor:
    """(B, P, D) tokens -> (B, H, W) long labels: arg-max of the logits upsampled to `size`."""
    decoder.eval()
    logits, _ = decoder(tokens, grid)
    return upsample(logits.float(), size).argmax(1)


# ------------------------------------------------------------------------------------- losses


def pseudo_label_maps(cams: torch.Tensor, bg_threshold: float = 0.1, background: bool = True) -> torch.Tensor:
    """Normalised pseudo-label maps: per image min-max over all its concept maps, plus background.

    Args:
        cams: (B, C, h, w) concept CAMs.
        bg_threshold: Background = relu(bg_threshold - max over concepts).
        background: Put the background channel first (object-centric); False for
            scene-centric concepts (things + stuff, no background).

    Returns:
        (B, C + 1, h, w) with channel 0 the background, or (B, C, h, w).
    """
    flat = cams.float().flatten(1)
    lo = flat.min(1)[0].view(-1, 1, 1, 1)
    hi = flat.max(1)[0].view(-1, 1, 1, 1)
    norm = (cams.float() - lo) / (hi - lo).clamp(min=1e-12)
    if not background:
        return norm
    bg = F.relu(bg_threshold - norm.max(1, keepdim=True)[0])
    return torch.cat([bg, norm], 1)


def foreground_pixels(cams: torch.Tensor, bg_threshold: float = 0.1) -> torch.Tensor:
    """(B, h, w) bool: some normalised concept map exceeds the threshold (official `fg_area`)."""
    return pseudo_label_maps(cams, bg_threshold, background=False).gt(bg_threshold).any(1)


def pseudo_label_target(
    cams: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    teacher_weight: float = 0.5,
    bg_threshold: float = 0.1,
    background: bool = True,
) -> torch.Tensor:
    """Training target (B, h, w) long: arg-max of the pseudo-label maps (channel 0 = background).

    With a teacher, the arg-max of teacher_weight * softmax(teacher_logits) +
    (1 - teacher_weight) * maps (the bootstrapped target).
    """
    maps = pseudo_label_maps(cams, bg_threshold, background)
    return _target_from_maps(maps, teacher_logits, teacher_weight)


def _target_from_maps(maps: torch.Tensor, teacher_logits: torch.Tensor | None, teacher_weight: float) -> torch.Tensor:
    if teacher_logits is not None:
        maps = teacher_weight * teacher_logits.float().softmax(1) + (1.0 - teacher_weight) * maps
    return maps.argmax(1)


def alpha_at(epoch: int, epochs: int, start: float = 0.03, end: float = 0.10) -> float:
    """Weight of the negative term: linear from `start` at epoch 0 to `end` at epoch `epochs - 1`, then `end`.

    `alpha_at(k, 8)` is the official list [0.03, 0.04, ..., 0.10] indexed by k, the epochs
    since the last teacher update.
    """
    if epochs <= 1:
        return end
    t = min(max(epoch, 0), epochs - 1) / (epochs - 1)
    return start + (end - start) * t


def category_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """L_cat: cross-entropy to the target minus alpha times the cross-entropy to a negative
    target (the target relabelled by one random permutation of the K channels); mean over pixels.
    """
    loss = F.cross_entropy(logits.float(), target)
    if alpha:
        perm = torch.randperm(logits.shape[1], generator=generator).to(target.device)
        loss = loss - alpha * F.cross_entropy(logits.float(), perm[target])
    return loss


def uncertainty_loss(logits: torch.Tensor, fg: torch.Tensor, skip_background: bool = True) -> torch.Tensor:
    """L_unc: mean over the foreground pixels of 1 - (p_top1 - p_top2) of the student's softmax.

    Args:
        logits: (B, K, h, w) student logits.
        fg: (B, h, w) bool pixels the loss averages over.
        skip_background: The softmax is over channels 1.. only (the official object-centric
            loss); False uses all channels (scene-centric).

    Returns:
        Scalar; 0 (in the graph) when no pixel is foreground, and when a single class is left
        (one thing concept, e.g. Weizmann horses): its softmax is 1 everywhere, no doubt to penalise.
    """
    z = logits[:, 1:] if skip_background else logits
    if z.shape[1] < 2:
        return z.sum() * 0.0
    top = z.float().softmax(1).topk(2, dim=1)[0]
    margin = 1.0 - (top[:, 0] - top[:, 1])
    if not bool(fg.any()):
        return margin.sum() * 0.0
    return margin[fg].mean()


def embedding_loss(class_emb: torch.Tensor) -> torch.Tensor:
    """L_emb: mean over pairs i != j of 1 + cos(e_i, e_j); (K, D) or (B, K, D), batch-averaged."""
    e = F.normalize(class_emb.float(), dim=-1)
    if e.ndim == 2:
        e = e[None]
    k = e.shape[1]
    if k < 2:
        return e.sum() * 0.0
    iu = torch.triu_indices(k, k, offset=1, device=e.device)
    cos = (e @ e.transpose(1, 2))[:, iu[0], iu[1]]
    return (1.0 + cos).mean()


# ------------------------------------------------------------------------------ bootstrapping


class Bootstrapper:
    """The teacher of TransFGU's bootstrapping and the student's initial weights.

    Attributes:
        initial: Deep copy of the student's state dict at creation.
        teacher: None before the first update, then a frozen copy of the student (eval mode).
    """

    def __init__(self, student: nn.Module) -> None:
        self.initial = copy.deepcopy(student.state_dict())
        self.teacher: nn.Module | None = None

    def update(self, student: nn.Module) -> None:
        """Teacher <- the current student (deep copy); student <- its initial weights, in place."""
        teacher = copy.deepcopy(student).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        student.load_state_dict(self.initial)


def update_interval(epoch: int, intervals: Sequence[int], span: int = 10) -> int:
    """Teacher-update interval in force at `epoch`: intervals[min(epoch // span, len - 1)]."""
    return int(intervals[min(epoch // span, len(intervals) - 1)])


def is_teacher_update(epoch: int, start: int, intervals: Sequence[int], span: int = 10) -> bool:
    """Whether the teacher is updated at the start of `epoch` (official rule:
    epoch >= start and epoch % interval == 0)."""
    return epoch >= start and epoch % update_interval(epoch, intervals, span) == 0


# ------------------------------------------------------------------------------- augmentation


def random_resized_crop_pair(
    image: torch.Tensor,
    label_maps: torch.Tensor,
    scale: tuple[float, float] = (0.4, 1.0),
    out_size: int = 224,
    patch: int = 14,
    generator: torch.Generator | None = None,
    box: tuple[float, float, float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float, float, float]]:
    """One random box of the image and its pseudo-label maps.

    The box side is s * (H, W) with s uniform in `scale` (the image's aspect ratio is kept),
    at a uniform position. The image crop (integer pixels) is resized bilinearly to
    `out_size`; the label maps are cropped with `torchvision.ops.roi_align` (aligned=True)
    on the same box, onto the crop's token grid (out_size // patch).

    Args:
        image: (3, H, W) float image.
        label_maps: (C, h, w) maps covering the same field of view as the image.
        box: (y0, x0, y1, x1) in [0, 1] to use instead of a random one.

    Returns:
        image crop (3, out, out), label crop (C, out // patch, out // patch) and the box
        actually used, normalised.
    """
    if out_size % patch:
        raise ValueError(f"crop size {out_size} is not a multiple of the patch size {patch}")
    _, big_h, big_w = image.shape
    if box is None:
        r = torch.rand(3, generator=generator).tolist()
        s = scale[0] + (scale[1] - scale[0]) * r[0]
        y0, x0 = (1.0 - s) * r[1], (1.0 - s) * r[2]
        box = (y0, x0, y0 + s, x0 + s)
    py0, px0 = int(round(box[0] * big_h)), int(round(box[1] * big_w))
    py1, px1 = max(py0 + 1, int(round(box[2] * big_h))), max(px0 + 1, int(round(box[3] * big_w)))
    py1, px1 = min(py1, big_h), min(px1, big_w)
    used = (py0 / big_h, px0 / big_w, py1 / big_h, px1 / big_w)
    crop = image[None, :, py0:py1, px0:px1].float()
    img = F.interpolate(crop, size=(out_size, out_size), mode="bilinear", align_corners=False)[0]
    c, h, w = label_maps.shape
    roi = torch.tensor(
        [[0.0, used[1] * w, used[0] * h, used[3] * w, used[2] * h]], dtype=torch.float32, device=label_maps.device
    )
    grid = out_size // patch
    lab = roi_align(
        label_maps[None].float(), roi, output_size=(grid, grid), spatial_scale=1.0, sampling_ratio=0, aligned=True
    )[0]
    return img, lab, used


def _photometric() -> v2.Transform:
    """The official image augmentation: jitter (p 0.3), grayscale (p 0.2), blur (p 0.2)."""
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.3),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(3, sigma=(1.0, 2.0))], p=0.2),
    ])


# ----------------------------------------------------------------------------------- training


def num_classes_of(num_concepts: int, scene_centric: bool) -> int:
    """Decoder classes: the concepts plus a background channel unless scene-centric."""
    return num_concepts if scene_centric else num_concepts + 1


def build_optimizer(decoder: nn.Module, cfg: TransFGUConfig) -> torch.optim.Adam:
    """Adam; no weight decay on biases and 1-d parameters (norms), as the official groups."""
    decay, no_decay = [], []
    for name, p in decoder.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def transfgu_losses(
    logits: torch.Tensor,
    class_emb: torch.Tensor,
    cams: torch.Tensor,
    cfg: TransFGUConfig,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """L_cat, L_unc, L_emb and their weighted sum for one batch.

    Args:
        logits: (B, K, h, w) student logits.
        class_emb: (B, K, d) the decoder's class features.
        cams: (B, C, h, w) concept CAMs of the batch's crops (not normalised).
        teacher_logits: (B, K, h, w) or None before bootstrapping.
        alpha: Weight of the negative term (used only with a teacher, as the official).
    """
    background = not cfg.scene_centric
    maps = pseudo_label_maps(cams, cfg.bg_threshold, background)
    if maps.shape[1] != logits.shape[1]:
        raise ValueError(f"{maps.shape[1]} pseudo-label channels for {logits.shape[1]} decoder classes")
    target = _target_from_maps(maps, teacher_logits, cfg.teacher_weight)
    l_cat = category_loss(logits, target, alpha if teacher_logits is not None else 0.0, generator)
    if background:
        fg = maps[:, 1:].gt(cfg.bg_threshold).any(1)
    else:
        fg = torch.ones_like(target, dtype=torch.bool)
    l_unc = uncertainty_loss(logits, fg, skip_background=background)
    l_emb = embedding_loss(class_emb)
    total = cfg.weight_cat * l_cat + cfg.weight_unc * l_unc + cfg.weight_emb * l_emb
    return {"loss": total, "cat": l_cat, "unc": l_unc, "emb": l_emb}


def train_transfgu(
    tokens_fn: Callable[[torch.Tensor], torch.Tensor],
    cams_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    num_images: int,
    cfg: TransFGUConfig,
    in_dim: int,
    patch_size: int,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    device: torch.device | str = "cpu",
) -> MaskTransformerDecoder:
    """Train the decoder on CAM pseudo-labels with bootstrapping.

    Each epoch starts with a teacher update when `is_teacher_update` says so; then full
    batches of augmented crops (photometric jitter, random resized crop, flip) go through
    the frozen backbone (`tokens_fn`) and the decoder.

    Args:
        tokens_fn: Frozen backbone: (B, 3, S, S) ImageNet-normalised crops on `device` ->
            (B, P, in_dim) patch tokens, P = (S / patch_size)^2 (no gradient needed).
        cams_fn: `cams_fn(j)` -> (image (3, H, W) float RGB in [0, 1], CAMs (C, h, w)
            covering that image) for training image j < num_images.
        num_images: Number of training images.
        cfg: Hyperparameters (train_size, epochs, losses, bootstrapping).
        in_dim: Token width of the backbone.
        patch_size: Patch size of the backbone.
        progress: Show a progress bar over iterations.
        log: Called once per epoch with {"epoch", "loss", "cat", "unc", "emb", "alpha",
            "teacher_updated", "skipped"} (skipped: steps whose loss was not positive,
            which the official code does not apply).
        device: Where to train.

    Returns:
        The student decoder, in eval mode.

    Raises:
        DataError: No training image.
        UsegError: The loss became NaN or infinite.
    """
    if num_images < 1:
        raise DataError("transfgu: no training image")
    if cfg.train_size % patch_size:
        raise ParamsError(
            f"params key 'transfgu.train_size': {cfg.train_size} is not a multiple of the patch size {patch_size}"
        )
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    _, first_cams = cams_fn(0)
    k = num_classes_of(first_cams.shape[0], cfg.scene_centric)
    decoder = MaskTransformerDecoder(in_dim, k, cfg.d_model, cfg.decoder_depth, cfg.decoder_heads, cfg.dropout)
    decoder = decoder.to(device)
    boot = Bootstrapper(decoder)
    optimizer = build_optimizer(decoder, cfg)
    photometric = _photometric() if cfg.photometric else None
    batch_size = min(cfg.batch_size, num_images)
    dist.check_divisible(batch_size, "transfgu.batch_size")
    per_epoch = num_images // batch_size
    grid = cfg.train_size // patch_size
    mean, std = IMAGENET_MEAN.to(device), IMAGENET_STD.to(device)
    total = cfg.epochs * per_epoch
    bar = iter(track(range(total), "transfgu (TransFGU)", total=total, disable=not progress))
    since_update = 0
    for epoch in range(cfg.epochs):
        updated = is_teacher_update(epoch, cfg.bootstrap_start, cfg.bootstrap_every, cfg.bootstrap_span)
        if updated:
            boot.update(decoder)
            since_update = 0
        elif epoch:
            since_update += 1
        if boot.teacher is None:
            alpha = 0.0
        elif cfg.alpha_ramp_epochs:
            alpha = alpha_at(since_update, cfg.alpha_ramp_epochs, cfg.alpha_start, cfg.alpha_end)
        else:
            alpha = alpha_at(epoch, cfg.epochs, cfg.alpha_start, cfg.alpha_end)
        decoder.train()
        sums = np.zeros(4)
        steps = skipped = 0
        order = torch.randperm(num_images, generator=gen).tolist()
        for b in range(per_epoch):
            xs, ms = [], []
            for j in order[b * batch_size : (b + 1) * batch_size]:
                image, cams = cams_fn(j)
                image = image.float().clamp(0, 1)
                if photometric is not None:
                    image = photometric(image)
                image = (image.to(device) - mean) / std
                x, m, _ = random_resized_crop_pair(
                    image, cams.to(device).float(), (cfg.min_scale, 1.0), cfg.train_size, patch_size, gen
                )
                if cfg.hflip and float(torch.rand(1, generator=gen)) < 0.5:
                    x, m = x.flip(-1), m.flip(-1)
                xs.append(x)
                ms.append(m)
            # every rank draws the whole batch (one random stream) and trains on its share
            x, cams_b = dist.part(torch.stack(xs)), dist.part(torch.stack(ms))
            with torch.no_grad():
                tokens = tokens_fn(x).float()
            logits, class_emb = decoder(tokens, (grid, grid))
            teacher_logits = None
            if boot.teacher is not None:
                with torch.no_grad():
                    teacher_logits = boot.teacher(tokens, (grid, grid))[0]
            losses = transfgu_losses(logits, class_emb, cams_b, cfg, teacher_logits, alpha, gen)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise UsegError(f"transfgu: the loss became {loss.item()} at epoch {epoch}; lower transfgu.lr")
            optimizer.zero_grad(set_to_none=True)
            if dist.total(loss.item()) > 0:  # the ranks step together
                if loss.requires_grad:
                    loss.backward()
                dist.average_gradients(list(decoder.parameters()))
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_value_(decoder.parameters(), cfg.grad_clip)
                optimizer.step()
            else:
                skipped += 1
            sums += [dist.mean(losses[name].item()) for name in ("loss", "cat", "unc", "emb")]
            steps += 1
            next(bar, None)
        if log is not None:
            mean_l = sums / max(1, steps)
            log({
                "epoch": epoch, "loss": mean_l[0], "cat": mean_l[1], "unc": mean_l[2], "emb": mean_l[3],
                "alpha": alpha, "teacher_updated": updated, "skipped": skipped,
            })
    for _ in bar:
        pass
    return decoder.eval()
