"""Object-mask mining: the algorithms behind the `mine` stage (no file I/O).

Three mask sources, each a pure function of one image's arrays:

- `attention_mask`: MaskDistill's mask from the last self-attention block of a ViT
  (wvangansbeke/MaskDistill, `gen_masks.py: mask_generator`, itself after LOST): one
  object mask per image on the token grid.
- `prior_saliency` + `postprocess_saliency`: a handcrafted saliency map (no learned
  weights) thresholded and cleaned as MaskContrast post-processes its saliency masks.
- `spectral_masks`: the scene-centric extension, Deep Spectral Methods style
  (lukemelas/deep-spectral-segmentation, `extract.py`): several segments per image from
  the eigenvectors of a feature-affinity Laplacian.

Plus the helpers the stage needs around them: `upsample_mask`, `mask_box`, `mask_score`
and `cls_attention_map` (the score map of attention masks).

Grids are (h, w) token grids, P = h * w, tokens in row-major order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from scipy import linalg, ndimage
from sklearn.cluster import KMeans

MASS_NORMALISATIONS = ("sum", "softmax")

# 8-connectivity, as cv2.findContours (used by MaskContrast) traces outer boundaries.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------------------
# MaskDistill attention masks
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionMiningConfig:
    """Parameters of MaskDistill's attention mask (defaults = the official code's).

    Attributes:
        num_heads_avg: the CLS-to-patch attention logits are averaged over the first
            `num_heads_avg` heads of the last block (official `--heads 5`).
        attn_mass: fraction of the attention mass kept before ranking (official 0.5,
            DINO's `threshold_attention`); patches outside it get attention 0.
        topk: fraction of the patches ranked by that attention that form the proposal
            set (official `--topk 0.4`).
        mass_normalisation: how the averaged logits are turned into a mass for
            `attn_mass`: "sum" (official: raw unscaled logits divided by their sum) or
            "softmax" (softmax with the model's 1/sqrt(head_dim) scale). The ranking
            is the same either way; only the set of patches inside the mass changes.
    """

    num_heads_avg: int = 5
    attn_mass: float = 0.5
    topk: float = 0.4
    center_keys: bool = False
    mass_normalisation: str = "sum"

    def __post_init__(self) -> None:
        if self.num_heads_avg < 1:
            raise ValueError(f"num_heads_avg must be >= 1, got {self.num_heads_avg}")
        if not 0.0 < self.attn_mass <= 1.0:
            raise ValueError(f"attn_mass must be in (0, 1], got {self.attn_mass}")
        if not 0.0 < self.topk <= 1.0:
            raise ValueError(f"topk must be in (0, 1], got {self.topk}")
        if self.mass_normalisation not in MASS_NORMALISATIONS:
            raise ValueError(
                f"mass_normalisation must be one of {', '.join(MASS_NORMALISATIONS)}, got {self.mass_normalisation!r}"
            )


def _check_grid(num_patches: int, grid: Sequence[int], what: str) -> tuple[int, int]:
    h, w = (int(v) for v in grid)
    if h * w != num_patches:
        raise ValueError(f"{what}: {num_patches} patches do not fill a {h}x{w} grid")
    return h, w


def cls_patch_logits(cls_query: np.ndarray, keys: np.ndarray, heads: int) -> np.ndarray:
    """Unscaled CLS-to-patch attention logits q_cls . k_patch per head.

    Args:
        cls_query: (D,) last-block CLS query, heads concatenated head-major.
        keys: (P, D) last-block patch keys, same layout.
        heads: number of attention heads (D must be a multiple of it).

    Returns:
        (heads, P) float64 logits, without the 1/sqrt(head_dim) scale (as MaskDistill).
    """
    q = np.asarray(cls_query, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    if q.ndim != 1 or k.ndim != 2 or k.shape[1] != q.shape[0]:
        raise ValueError(f"cls_query (D,) and keys (P, D) expected, got {q.shape} and {k.shape}")
    d = q.shape[0]
    if heads < 1 or d % heads:
        raise ValueError(f"dimension {d} is not divisible into {heads} heads")
    dh = d // heads
    return np.einsum("hd,phd->hp", q.reshape(heads, dh), k.reshape(k.shape[0], heads, dh))


def attention_mass_mask(attn: np.ndarray, mass: float) -> np.ndarray:
    """The patches that together hold `mass` of the attention (DINO's `threshold_attention`).

    Patches are sorted by attention; the largest are kept while the mass of those
    before them is below `mass` (so the patch that crosses the threshold is kept).
    `attn` is normalised by its sum first; when the sum is not positive (signed logits
    that cancel) the mass is undefined and every patch is kept.

    Args:
        attn: (P,) non-normalised attention (or logits, as MaskDistill uses).
        mass: fraction of the total in (0, 1].

    Returns:
        (P,) bool.
    """
    a = np.asarray(attn, dtype=np.float64).reshape(-1)
    total = a.sum()
    if not total > 0:
        return np.ones(a.shape, dtype=bool)
    order = np.argsort(a, kind="stable")  # ascending, as the official code
    cum = np.cumsum(a[order] / total)
    keep = np.empty(a.shape, dtype=bool)
    keep[order] = cum > 1.0 - mass
    return keep


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def attention_mask(
    cls_query: np.ndarray,
    keys: np.ndarray,
    grid: Sequence[int],
    heads: int,
    cfg: AttentionMiningConfig = AttentionMiningConfig(),
) -> np.ndarray:
    """MaskDistill's object mask on the token grid from the last attention block.

    Follows `mask_generator` of the official code:

    1. G_cls = unscaled q_cls . k_patch per head, averaged over the first
       `cfg.num_heads_avg` heads; patches outside `cfg.attn_mass` of its mass set to 0.
    2. Proposal set = the top `cfg.topk` fraction of patches by G_cls; seed = the top one.
    3. Affinity G_i = sum over heads of K_h K_h^T (= K K^T on the concatenated keys).
       Source nodes = proposals with positive affinity to the seed; the patches whose
       summed affinity to the source nodes is positive form the foreground.
    4. The 4-connected component of the foreground that holds the seed is the mask.

    Differences from the official code, none of which changes a regular case:
    ties in the top-k ranking are broken by patch index (stable sort; `torch.topk` leaves
    them unspecified, and the zeroed patches outside the mass are all tied); at least one
    patch is always proposed; a non-positive mass total keeps every patch (see
    `attention_mass_mask`); and the seed patch is always in the mask (the official code
    would return the background component if the seed were not foreground, which only a
    zero key can cause). The seed/affinity decisions are made in float64.

    Args:
        cls_query: (D,) last-block CLS query (heads concatenated head-major).
        keys: (P, D) last-block patch keys, same layout, P = h * w row-major.
        grid: (h, w) token grid.
        heads: number of attention heads of the block.
        cfg: mining parameters.

    Returns:
        (h, w) bool mask, never empty.
    """
    h, w = _check_grid(np.shape(keys)[0], grid, "keys")
    logits = cls_patch_logits(cls_query, keys, heads)
    if cfg.num_heads_avg > heads:
        raise ValueError(f"num_heads_avg={cfg.num_heads_avg} exceeds the {heads} heads of the model")
    g_cls = logits[: cfg.num_heads_avg].mean(axis=0)
    if cfg.mass_normalisation == "softmax":
        mass_of = _softmax(g_cls / np.sqrt(np.shape(keys)[1] // heads))
    else:
        mass_of = g_cls
    g_cls = np.where(attention_mass_mask(mass_of, cfg.attn_mass), g_cls, 0.0)

    num_patches = h * w
    k = max(1, int(cfg.topk * num_patches))
    proposals = np.argsort(-g_cls, kind="stable")[:k]
    seed = int(proposals[0])

    kf = np.asarray(keys, dtype=np.float64)
    if cfg.center_keys:
        # DINOv2's last-block keys share a large common component: every key-key product is
        # positive and the "mask" would be the whole image. Centring per image restores the
        # sign structure LOST/MaskDistill rely on (our deviation for DINOv2 backbones).
        kf = kf - kf.mean(axis=0, keepdims=True)
    sources = proposals[kf[proposals] @ kf[seed] > 0.0]
    # sum of the affinity rows of the sources = K @ (sum of their keys): O(P D), not O(P^2 D)
    diffused = kf @ kf[sources].sum(axis=0)
    foreground = (diffused > 0.0).reshape(h, w)
    sr, sc = divmod(seed, w)
    foreground[sr, sc] = True
    labels, _ = ndimage.label(foreground)  # default structure: 4-connectivity
    return labels == labels[sr, sc]


def cls_attention_map(cls_attn: np.ndarray, grid: Sequence[int], num_heads_avg: int | None = None) -> np.ndarray:
    """Head-averaged CLS-to-patch attention on the grid, scaled so its mean is 1.

    The score of an attention mask is the mean of this map inside it (`mask_score`):
    how many times more attention the CLS token pays to the mask's patches than to an
    average patch (> 1: more than average). The scaling removes the dependence on the
    grid size and on the attention spent on non-patch tokens (CLS, registers).

    Args:
        cls_attn: (heads, P) softmax attention of the CLS query to the patch tokens.
        grid: (h, w) token grid.
        num_heads_avg: average over the first heads only (None: all heads).

    Returns:
        (h, w) float32.
    """
    a = np.asarray(cls_attn, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"cls_attn must be (heads, P), got shape {a.shape}")
    h, w = _check_grid(a.shape[1], grid, "cls_attn")
    a = a[: num_heads_avg or a.shape[0]].mean(axis=0)
    total = a.sum()
    scaled = a * (a.size / total) if total > 0 else np.ones_like(a)
    return scaled.reshape(h, w).astype(np.float32)


# --------------------------------------------------------------------------------------
# Mask helpers
# --------------------------------------------------------------------------------------


def upsample_mask(mask_grid: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
    """Resize a (grid) mask to `out_hw` = (H, W): bilinear on the float mask, >= 0.5.

    MaskDistill itself upsamples nearest-neighbour by the patch size and crops its
    padding; bilinear gives smoother borders at non-integer scales.

    Returns:
        (H, W) bool.
    """
    m = np.asarray(mask_grid, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    out_h, out_w = (int(v) for v in out_hw)
    up = cv2.resize(m, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    return up.reshape(out_h, out_w) >= 0.5


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of a mask, x1/y1 exclusive: `mask[y0:y1, x0:x1]`.

    Raises:
        ValueError: for an empty mask.
    """
    m = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask has no bounding box")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def mask_score(mask: np.ndarray, score_map: np.ndarray) -> float:
    """Mean of `score_map` inside `mask` (same shape).

    Attention masks are scored on `cls_attention_map` (mean relative CLS attention),
    saliency masks on the saliency map (mean saliency, in [0, 1]).
    """
    m = np.asarray(mask, dtype=bool)
    s = np.asarray(score_map)
    if m.shape != s.shape:
        raise ValueError(f"mask {m.shape} and score map {s.shape} differ in shape")
    if not m.any():
        raise ValueError("cannot score an empty mask")
    return float(s[m].astype(np.float64).mean())


# --------------------------------------------------------------------------------------
# Saliency masks (MaskContrast)
# --------------------------------------------------------------------------------------


def postprocess_saliency(
    sal: np.ndarray, threshold: float = 0.5, min_component: float = 0.01, min_area: float = 0.01
) -> np.ndarray | None:
    """MaskContrast's saliency post-processing: threshold, drop small segments, drop tiny masks.

    Pixels with saliency > `threshold` are salient; 8-connected salient components
    smaller than `min_component` of the image are removed; if what is left covers less
    than `min_area` of the image, the image is dropped (None).

    MaskContrast measures a segment by the filled area of its contour
    (`cv2.findContours` + `drawContours(FILLED)`), so a ring around a large hole counts
    as large there; here a component's area is its pixel count.

    Args:
        sal: (H, W) saliency in [0, 1].
        threshold: saliency threshold.
        min_component: minimum component area, fraction of the image.
        min_area: minimum total salient area, fraction of the image.

    Returns:
        (H, W) bool mask, or None when the image has too little salient area.
    """
    s = np.asarray(sal)
    if s.ndim != 2:
        raise ValueError(f"saliency map must be 2-D, got shape {s.shape}")
    mask = s > threshold
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_component * mask.size
        keep[0] = False
        mask = keep[labels]
    if mask.sum() < min_area * mask.size:
        return None
    return mask


def _normalise01(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def _boundary_contrast(lab: np.ndarray, strip: int) -> np.ndarray:
    """Colour distance of every pixel to the closest of the four border strips' mean colours."""
    sides = (lab[:strip], lab[-strip:], lab[:, :strip], lab[:, -strip:])
    dists = [np.linalg.norm(lab - s.reshape(-1, 3).mean(axis=0), axis=-1) for s in sides]
    return np.minimum.reduce(dists)


def _centre_prior(h: int, w: int, sigma: float) -> np.ndarray:
    y = (np.arange(h, dtype=np.float32) + 0.5) / h - 0.5
    x = (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
    return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2.0 * sigma**2))


def prior_saliency(
    image: np.ndarray, work_size: int = 128, centre_sigma: float = 0.35, centre_weight: float = 0.5
) -> np.ndarray:
    """Handcrafted saliency with no learned weights: colour contrast + boundary and centre priors.

    At `work_size` (longer side) in CIE Lab, after a light Gaussian blur:
    - frequency-tuned contrast (Achanta et al. 2009): distance to the mean image colour;
    - boundary prior: distance to the mean colour of the closest of the four border
      strips (5% of the shorter side; background tends to touch the image border).
    Both are normalised to [0, 1] and averaged, weighted by a Gaussian centre prior
    (`1 - centre_weight + centre_weight * gaussian(centre_sigma)`), smoothed, normalised
    to [0, 1] and resized back. A flat image gives all zeros.

    Args:
        image: (H, W, 3) uint8 RGB.
        work_size: longer side of the working resolution.
        centre_sigma: std of the centre prior, in fractions of the image side.
        centre_weight: strength of the centre prior in [0, 1].

    Returns:
        (H, W) float32 saliency in [0, 1].
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {img.shape}")
    big_h, big_w = img.shape[:2]
    scale = min(1.0, work_size / max(big_h, big_w))
    h, w = max(1, round(big_h * scale)), max(1, round(big_w * scale))
    small = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA) if (h, w) != (big_h, big_w) else img
    lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    lab = cv2.GaussianBlur(lab, (0, 0), sigmaX=1.0)

    contrast = np.linalg.norm(lab - lab.reshape(-1, 3).mean(axis=0), axis=-1)
    boundary = _boundary_contrast(lab, strip=max(1, round(0.05 * min(h, w))))
    sal = 0.5 * (_normalise01(contrast) + _normalise01(boundary))
    sal *= 1.0 - centre_weight + centre_weight * _centre_prior(h, w, centre_sigma)
    sal = cv2.GaussianBlur(sal.astype(np.float32), (0, 0), sigmaX=max(0.5, 0.02 * max(h, w)))
    sal = _normalise01(sal)
    if (h, w) != (big_h, big_w):
        sal = cv2.resize(sal, (big_w, big_h), interpolation=cv2.INTER_LINEAR)
    return np.clip(sal, 0.0, 1.0).astype(np.float32).reshape(big_h, big_w)


# --------------------------------------------------------------------------------------
# Scene-centric masks: Deep Spectral Methods
# --------------------------------------------------------------------------------------


def spectral_embedding(features: np.ndarray, num_eigenvectors: int) -> np.ndarray:
    """The first non-trivial eigenvectors of the normalised Laplacian of W = max(0, F F^T).

    As Deep Spectral Methods (`which_matrix="laplacian"`, no colour term): features
    L2-normalised, W thresholded at zero, then the generalised problem
    (D - W) v = lambda D v, solved here through the symmetric normalised Laplacian
    I - D^-1/2 W D^-1/2 (eigenvectors u, v = D^-1/2 u: the same vectors, D-normalised).
    The constant eigenvector (lambda = 0) is dropped.

    Args:
        features: (P, D) per-patch features.
        num_eigenvectors: how many non-trivial eigenvectors (capped at P - 1).

    Returns:
        (P, n) float64, column j = eigenvector j + 1 (ascending eigenvalue), sign fixed so
        that at most half of its entries are positive (DSM's convention).
    """
    f = np.asarray(features, dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    aff = np.maximum(f @ f.T, 0.0)
    deg = aff.sum(axis=1)
    d_isqrt = 1.0 / np.sqrt(np.maximum(deg, 1e-12))
    lap = np.eye(len(f)) - d_isqrt[:, None] * aff * d_isqrt[None, :]
    n = max(1, min(int(num_eigenvectors), len(f) - 1))
    _, u = linalg.eigh(lap, subset_by_index=[0, n], driver="evx")
    vecs = d_isqrt[:, None] * u[:, 1:]
    flip = (vecs > 0).mean(axis=0) > 0.5
    vecs[:, flip] *= -1.0
    return vecs


def spectral_masks(
    patch_tokens: np.ndarray,
    grid: Sequence[int],
    k: int,
    num_eigenvectors: int | None = None,
    min_area: float = 0.0,
    seed: int = 0,
    n_init: int = 10,
) -> list[np.ndarray]:
    """Scene-centric masks: K-means on spectral-embedding rows, one mask per segment.

    Deep Spectral Methods' multi-region segmentation: the eigenvector rows are
    clustered into `k` segments and each segment (not each connected component) is one
    semantic-segment mask. DSM uses the last-block keys as features (pass `keys` here
    to match it) and, by default, all 19 computed non-trivial eigenvectors; we default
    to the first `k` (standard spectral clustering).

    Args:
        patch_tokens: (P, D) features of one image (P = h * w row-major).
        grid: (h, w) token grid.
        k: number of segments.
        num_eigenvectors: non-trivial eigenvectors to embed with (None: `k`).
        min_area: drop segments smaller than this fraction of the grid.
        seed: K-means random state.
        n_init: K-means restarts.

    Returns:
        (h, w) bool masks, largest first (ties: the one whose first patch comes first).
    """
    tokens = np.asarray(patch_tokens)
    if tokens.ndim != 2:
        raise ValueError(f"patch_tokens must be (P, D), got shape {tokens.shape}")
    h, w = _check_grid(tokens.shape[0], grid, "patch_tokens")
    if not 1 <= k <= tokens.shape[0]:
        raise ValueError(f"k={k} segments need 1 <= k <= {tokens.shape[0]} patches")
    if k == 1:
        return [np.ones((h, w), dtype=bool)]
    emb = spectral_embedding(tokens, num_eigenvectors or k)
    labels = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit_predict(emb)
    masks = [(labels == c).reshape(h, w) for c in range(k)]
    masks = [m for m in masks if m.any() and m.sum() >= min_area * m.size]
    masks.sort(key=lambda m: (-int(m.sum()), int(np.argmax(m))))
    return masks
