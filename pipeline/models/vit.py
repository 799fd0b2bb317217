"""A timm-style Vision Transformer in plain torch (DINO / DINOv2 layouts).

Parameter names follow timm and the official DINO / DINOv2 code (`cls_token`, `pos_embed`,
`patch_embed.proj.*`, `blocks.{i}.norm1.*`, `blocks.{i}.attn.qkv.*`, `blocks.{i}.ls1.gamma`,
`norm.*`), so their plain state dicts load without renaming.

The last block keeps its attention probabilities, queries and keys of the latest forward
(`blocks[-1].attn.last_attn`, `.last_q`, `.last_k`): mask mining reads the CLS attention
and the keys, and TransFGU back-propagates a loss to the attention map (set
`retain_attn_grad = True` on the model to keep its `.grad`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a ViT.

    Attributes:
        patch_size: Side of a square patch in pixels.
        embed_dim: Token width D.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        mlp_ratio: Hidden width of the MLP relative to D.
        pos_grid: Side of the square grid the stored position embedding was trained for.
        layer_scale: Initial LayerScale value, or None for no LayerScale (DINO v1).
        interpolate_offset: 0 resizes the position grid to the exact target size (Hugging
            Face DINOv2); > 0 uses the DINO recipe `scale_factor=(h + offset) / pos_grid`.
        norm_eps: LayerNorm epsilon.
    """

    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    pos_grid: int = 14
    layer_scale: float | None = None
    interpolate_offset: float = 0.1
    norm_eps: float = 1e-6


@dataclass
class ViTOutput:
    """What one forward pass of `VisionTransformer` returns.

    Attributes:
        tokens: (B, 1 + P, D) CLS then patch tokens (row-major), after the final norm.
        grid: (h, w) patch grid, P = h * w.
        attn: (B, heads, 1 + P, 1 + P) softmax attention of the last block.
        q: (B, heads, 1 + P, D / heads) queries of the last block (unscaled).
        k: (B, heads, 1 + P, D / heads) keys of the last block.
    """

    tokens: torch.Tensor
    grid: tuple[int, int]
    attn: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens with one strided convolution."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> (B, h * w, D) tokens and the grid (h, w)."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        x = self.proj(x)
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        return x.flatten(2).transpose(1, 2), grid


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    With `keep` set (the last block), the attention is computed explicitly and the softmax
    probabilities, queries and keys are kept on the module; otherwise the fused
    `scaled_dot_product_attention` kernel is used.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.keep = False
        self.retain_grad = False
        self.last_attn: torch.Tensor | None = None
        self.last_q: torch.Tensor | None = None
        self.last_k: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.keep:
            out = self._explicit_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def _explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if self.retain_grad and attn.requires_grad:
            attn.retain_grad()
        self.last_attn, self.last_q, self.last_k = attn, q, k
        return attn @ v


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT / DINOv2)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with optional LayerScale."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1: nn.Module = LayerScale(dim, cfg.layer_scale) if cfg.layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2: nn.Module = LayerScale(dim, cfg.layer_scale) if cfg.layer_scale is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], offset: float) -> torch.Tensor:
    """Resample the patch part of a (1, 1 + S*S, D) position embedding to `grid` (bicubic).

    Args:
        pos_embed: CLS position first, then a square S x S grid, row-major.
        grid: Target (h, w).
        offset: 0 resizes to exactly `grid`; > 0 follows DINO and scales by
            `(h + offset) / S`, `(w + offset) / S`.

    Returns:
        (1, 1 + h*w, D), unchanged when `grid` is (S, S).
    """
    n_patch = pos_embed.shape[1] - 1
    side = math.isqrt(n_patch)
    if side * side != n_patch:
        raise ValueError(f"position embedding with {n_patch} patch positions is not a square grid")
    if tuple(grid) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    if offset > 0:
        scale = ((grid[0] + offset) / side, (grid[1] + offset) / side)
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", align_corners=False)
    else:
        patch = F.interpolate(patch, size=tuple(grid), mode="bicubic", align_corners=False)
    if tuple(patch.shape[-2:]) != tuple(grid):
        raise ValueError(f"position grid resized to {tuple(patch.shape[-2:])}, expected {tuple(grid)}")
    patch = patch.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)
    return torch.cat([pos_embed[:, :1], patch], dim=1)


class VisionTransformer(nn.Module):
    """ViT encoder: patch embed, CLS token, position embedding, pre-norm blocks, final norm."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.blocks[-1].attn.keep = True
        self.init_weights()

    @property
    def retain_attn_grad(self) -> bool:
        """Whether the last block's attention keeps its `.grad` after backward."""
        return self.blocks[-1].attn.retain_grad

    @retain_attn_grad.setter
    def retain_attn_grad(self, value: bool) -> None:
        self.blocks[-1].attn.retain_grad = bool(value)

    def init_weights(self) -> None:
        """timm's initialisation: truncated normal (std 0.02) for weights and position embedding."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> ViTOutput:
        """Encode an ImageNet-normalised batch (B, 3, H, W); H and W multiples of the patch size."""
        tokens, grid = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        tokens = torch.cat([cls, tokens], dim=1)
        tokens = tokens + interpolate_pos_embed(self.pos_embed, grid, self.cfg.interpolate_offset)
        for block in self.blocks:
            tokens = block(tokens)
        last = self.blocks[-1].attn
        assert last.last_attn is not None and last.last_q is not None and last.last_k is not None
        return ViTOutput(self.norm(tokens), grid, last.last_attn, last.last_q, last.last_k)
