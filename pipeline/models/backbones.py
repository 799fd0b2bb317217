"""Backbone registry: ViTs (DINO, DINOv2) and CNNs (ResNet-50, MobileNetV2) by name.

`create_backbone("dinov2_vits14", "models/weights/dinov2_vits14_imgfocus.pt")` builds the
network and loads a checkpoint in any supported layout (see `pipeline.models.checkpoints`);
without a checkpoint the weights are randomly initialised. Every backbone maps an
ImageNet-normalised batch to a `BackboneOutput` of last-layer patch tokens on a grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.errors import ParamsError
from pipeline.models.checkpoints import load_checkpoint_into
from pipeline.models.cnn import MobileNetV2Trunk, ResNetTrunk
from pipeline.models.vit import ViTConfig, VisionTransformer


@dataclass
class BackboneOutput:
    """Last-layer features of one batch.

    Attributes:
        patch_tokens: (B, P, D) patch tokens after the final norm, P = h * w row-major.
        grid: (h, w) token grid.
        cls: (B, D) CLS token after the final norm (None for CNNs).
        cls_attn: (B, heads, P) last-block softmax attention of the CLS query to the patches.
        keys: (B, P, D) last-block keys of the patch tokens, heads concatenated (head-major).
        cls_query: (B, D) last-block CLS query (unscaled), same layout as `keys`.
    """

    patch_tokens: torch.Tensor
    grid: tuple[int, int]
    cls: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    cls_query: torch.Tensor | None = None


class Backbone(nn.Module):
    """A feature extractor with a fixed output stride.

    Attributes:
        patch_size: Input pixels per token side (the output stride).
        embed_dim: Token width D.
        num_heads: Attention heads of the last block (None for CNNs).
        core: The module whose state dict is the canonical checkpoint layout.
    """

    patch_size: int
    embed_dim: int
    num_heads: int | None
    core: nn.Module

    def forward(self, x: torch.Tensor) -> BackboneOutput:  # pragma: no cover - abstract
        """Encode an ImageNet-normalised batch (B, 3, H, W)."""
        raise NotImplementedError

    @property
    def last_attn(self) -> torch.Tensor | None:
        """(B, heads, 1 + P, 1 + P) attention of the last block in the latest forward (ViTs only)."""
        return None

    def load_checkpoint(self, path: str | Path) -> None:
        """Load weights from a checkpoint file (official, torchvision, MoCo or our own layout)."""
        load_checkpoint_into(self.core, path)


class ViTBackbone(Backbone):
    """A `VisionTransformer` as a backbone: tokens, CLS, last-block attention, keys and query."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.core = VisionTransformer(cfg)
        self.patch_size = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        self.num_heads = cfg.num_heads

    @property
    def retain_attn_grad(self) -> bool:
        """Keep `.grad` of the last block's attention (`last_attn`) after backward (TransFGU)."""
        return self.core.retain_attn_grad

    @retain_attn_grad.setter
    def retain_attn_grad(self, value: bool) -> None:
        self.core.retain_attn_grad = value

    @property
    def last_attn(self) -> torch.Tensor | None:
        return self.core.blocks[-1].attn.last_attn

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        out = self.core(x)
        b, heads, n, head_dim = out.k.shape
        return BackboneOutput(
            patch_tokens=out.tokens[:, 1:],
            grid=out.grid,
            cls=out.tokens[:, 0],
            cls_attn=out.attn[:, :, 0, 1:],
            keys=out.k[:, :, 1:].transpose(1, 2).reshape(b, n - 1, heads * head_dim),
            cls_query=out.q[:, :, 0].reshape(b, heads * head_dim),
        )


class CNNBackbone(Backbone):
    """A convolutional trunk whose last feature map, flattened row-major, gives the tokens."""

    def __init__(self, trunk: ResNetTrunk | MobileNetV2Trunk) -> None:
        super().__init__()
        self.core = trunk
        self.patch_size = 32
        self.embed_dim = trunk.out_dim
        self.num_heads = None

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        fmap = self.core(x)
        grid = (int(fmap.shape[-2]), int(fmap.shape[-1]))
        return BackboneOutput(patch_tokens=fmap.flatten(2).transpose(1, 2), grid=grid)


_REGISTRY: dict[str, Callable[[], Backbone]] = {}


def register_backbone(fn: Callable[[], Backbone]) -> Callable[[], Backbone]:
    """Register a zero-argument backbone constructor under its function name (timm style)."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_backbones() -> list[str]:
    """Names accepted by `create_backbone`, sorted."""
    return sorted(_REGISTRY)


def create_backbone(name: str, checkpoint: str | Path | None = None) -> Backbone:
    """Build a registered backbone in eval mode, randomly initialised or from a checkpoint.

    Args:
        name: A name from `list_backbones()`, e.g. "dinov2_vits14".
        checkpoint: Weights file; None keeps the random initialisation (seed torch first
            for reproducible weights).

    Raises:
        ParamsError: Unknown name.
        WeightsError: Unreadable checkpoint, unknown layout, missing keys or wrong shapes.
    """
    if name not in _REGISTRY:
        raise ParamsError(f"unknown backbone {name!r}; allowed: {', '.join(list_backbones())}")
    model = _REGISTRY[name]()
    if checkpoint is not None:
        model.load_checkpoint(checkpoint)
    return model.eval()


@register_backbone
def dinov2_vits14() -> Backbone:
    """DINOv2 ViT-S/14: 384-d, 12 blocks, 6 heads, LayerScale, 37x37 position grid, no registers."""
    return ViTBackbone(
        ViTConfig(patch_size=14, embed_dim=384, num_heads=6, pos_grid=37, layer_scale=1e-5, interpolate_offset=0.0)
    )


@register_backbone
def dino_vits16() -> Backbone:
    """Official DINO ViT-S/16 (14x14 position grid)."""
    return ViTBackbone(ViTConfig(patch_size=16, embed_dim=384, num_heads=6, pos_grid=14))


@register_backbone
def dino_vits8() -> Backbone:
    """Official DINO ViT-S/8 (28x28 position grid)."""
    return ViTBackbone(ViTConfig(patch_size=8, embed_dim=384, num_heads=6, pos_grid=28))


@register_backbone
def dino_vitb8() -> Backbone:
    """Official DINO ViT-B/8 (768-d, 12 heads, 28x28 position grid)."""
    return ViTBackbone(ViTConfig(patch_size=8, embed_dim=768, num_heads=12, pos_grid=28))


@register_backbone
def dino_vitb16() -> Backbone:
    """Official DINO ViT-B/16 (768-d, 12 heads, 14x14 position grid)."""
    return ViTBackbone(ViTConfig(patch_size=16, embed_dim=768, num_heads=12, pos_grid=14))


@register_backbone
def mobilenet_v2() -> Backbone:
    """torchvision MobileNetV2 features: 1280-d tokens at stride 32."""
    return CNNBackbone(MobileNetV2Trunk())


@register_backbone
def resnet50() -> Backbone:
    """torchvision ResNet-50 `layer4`: 2048-d tokens at stride 32 (also MoCo v2 checkpoints)."""
    return CNNBackbone(ResNetTrunk("resnet50"))
