"""AHMSA-Net: adaptive hierarchical multi-scale attention network (2024/25). See README.md.

Feature maps are (N, C, h, w) grids of patch tokens: at level 1 a 4×4 grid of 7×7-pixel patches
of the 28×28 map, then 2×2, then 1×1 (the single patch the MLP classifies).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["AHMSANet", "ChannelLayerNorm", "ChannelAttention", "SpatialMHSA", "FeedForward",
           "MultiScaleAttentionBlock", "AdaptiveDownsample"]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of (N, C, H, W) (Eq. 3), per position."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ChannelAttention(nn.Module):
    """Adaptive avg- and max-pooling over the grid, each through two 1×1 convs with ReLU between
    (shared), summed, sigmoid, multiplied on the channels (Fig. 2, left)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) +
                          self.mlp(F.adaptive_max_pool2d(x, 1)))
        return x * w


class SpatialMHSA(nn.Module):
    """Multi-head scaled dot-product self-attention between the patch tokens of a level (Eq. 4);
    Q, K, V by a 1×1 conv, heads concatenated and merged by a 1×1 conv (Fig. 2, right)."""

    def __init__(self, channels: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.to_qkv = nn.Conv2d(channels, 3 * inner, 1, bias=False)
        self.to_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        q, k, v = self.to_qkv(x).reshape(n, 3, self.heads, self.dim_head, h * w).unbind(1)
        attn = torch.softmax((q.transpose(-2, -1) @ k) / math.sqrt(self.dim_head), dim=-1)
        out = (v @ attn.transpose(-2, -1)).reshape(n, self.heads * self.dim_head, h, w)
        return self.to_out(out)


class FeedForward(nn.Module):
    """Two 1×1 convolutions with GELU between (expansion ``mult``)."""

    def __init__(self, channels: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, channels * mult, 1), nn.GELU(),
                                 nn.Dropout(dropout), nn.Conv2d(channels * mult, channels, 1),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiScaleAttentionBlock(nn.Module):
    """Channel attention → spatial MHSA → feed-forward, each pre-LayerNorm with a residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, ff_mult: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.ca = ChannelLayerNorm(channels), ChannelAttention(channels)
        self.norm2, self.sa = ChannelLayerNorm(channels), SpatialMHSA(channels, heads, dim_head)
        self.norm3, self.ff = ChannelLayerNorm(channels), FeedForward(channels, ff_mult, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ca(self.norm1(x))
        x = x + self.sa(self.norm2(x))
        return x + self.ff(self.norm3(x))


class AdaptiveDownsample(nn.Module):
    """Between levels (Eq. 2): 3×3 conv (channel aggregation, cin→cout) → LayerNorm → adaptive
    max pooling to ``ceil(h / factor)``."""

    def __init__(self, cin: int, cout: int, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = ChannelLayerNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        size = (-(-h // self.factor), -(-w // self.factor))
        return F.adaptive_max_pool2d(self.norm(self.conv(x)), size)


class AHMSANet(nn.Module):
    """(N, 3, 28, 28) (u, v, strain) map (or its five-region recombination) → (N, classes) logits.

    Patch embedding: ``patch_size``×``patch_size`` conv with the same stride (7 → a 4×4 grid),
    LayerNorm, learned position embedding. Levels with ``blocks`` multi-scale attention blocks
    at widths ``dim·2^l``, joined by adaptive downsampling (4×4 → 2×2 → 1×1 patches); the top
    level's single patch goes to the MLP head (LayerNorm, Linear, GELU, Linear).
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 3, image_size: int = 28,
                 patch_size: int = 7, dim: int = 64, blocks: tuple[int, ...] = (2, 2, 8),
                 heads: int = 3, dim_head: int = 32, ff_mult: int = 4, dropout: float = 0.0,
                 downsample_factor: int = 2) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch_size}")
        self.image_size = image_size
        grid = image_size // patch_size
        dims = [dim * 2 ** i for i in range(len(blocks))]
        self.patch_embed = nn.Sequential(nn.Conv2d(in_channels, dims[0], patch_size, patch_size),
                                         ChannelLayerNorm(dims[0]))
        self.pos_embed = nn.Parameter(torch.randn(1, dims[0], grid, grid) * 0.02)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, (c, n) in enumerate(zip(dims, blocks)):
            self.levels.append(nn.Sequential(*[MultiScaleAttentionBlock(c, heads, dim_head,
                                                                        ff_mult, dropout)
                                               for _ in range(n)]))
            if i + 1 < len(dims):
                self.downsamples.append(AdaptiveDownsample(c, dims[i + 1], downsample_factor))
        self.head = nn.Sequential(nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], dims[-1]),
                                  nn.GELU(), nn.Dropout(dropout), nn.Linear(dims[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"AHMSA-Net expects (N, C, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        x = self.patch_embed(x) + self.pos_embed
        for i, level in enumerate(self.levels):
            x = level(x)
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        # With the paper's 28/7 grid the top level already is one patch (4 → 2 → 1) and this
        # pooling is the identity; other patch sizes leave a grid that is max-pooled to one.
        return self.head(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))
