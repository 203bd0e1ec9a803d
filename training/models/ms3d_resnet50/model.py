"""Multi-scale 3D-ResNet50 (Jin et al., MBE 2024, 21(4): 5007-5031). See README.md.

Tensors are (N, C, T, H, W). Kernel sizes below are written (T, H, W).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MultiScale3DResNet50", "Bottleneck3D", "SpatioTemporalAttention", "RC1", "RC2", "RC3",
           "AFFA", "ChannelAttention3D"]


def _conv_bn(cin: int, cout: int, k, stride=1, relu: bool = True) -> nn.Sequential:
    k = (k, k, k) if isinstance(k, int) else tuple(k)
    layers: list[nn.Module] = [nn.Conv3d(cin, cout, k, stride, tuple(x // 2 for x in k),
                                         bias=False), nn.BatchNorm3d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Bottleneck3D(nn.Module):
    """1×1×1 reduce → 3×3×3 (stride) → 1×1×1 expand (×4), identity or projected shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(_conv_bn(cin, width, 1), _conv_bn(width, width, 3, stride),
                                  _conv_bn(width, cout, 1, relu=False))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         _conv_bn(cin, cout, 1, stride, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class SpatioTemporalAttention(nn.Module):
    """Attention after block 1, spatial then temporal.

    Spatial: per frame, channel-wise mean and max maps → 1×7×7 conv → sigmoid (an (H, W) map per
    frame). Temporal: per frame, the (C, H, W) mean and max → 1D conv over time (kernel 3) →
    sigmoid (one weight per frame).
    """

    def __init__(self, kernel: int = 7, temporal_kernel: int = 3) -> None:
        super().__init__()
        self.spatial = nn.Conv3d(2, 1, (1, kernel, kernel), padding=(0, kernel // 2, kernel // 2))
        self.temporal = nn.Conv1d(2, 1, temporal_kernel, padding=temporal_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        x = x * torch.sigmoid(self.spatial(s))
        t = torch.stack([x.mean(dim=(1, 3, 4)), x.amax(dim=(1, 3, 4))], dim=1)  # (N, 2, T)
        w = torch.sigmoid(self.temporal(t))  # (N, 1, T)
        return x * w[:, :, :, None, None]


class _GlobalBranch(nn.Module):
    """Global average pooling branch: pooled (C) → 1×1×1 conv → ReLU → broadcast over (T, H, W).
    No BatchNorm here: on a pooled map it would fail for a training batch of one."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv3d(channels, channels, 1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.adaptive_avg_pool3d(x, 1)).expand_as(x)


class _WeightedSum(nn.Module):
    """K = Σ w_i X_i with one learnable scalar per branch output (Eq. 3.8 / 3.9), init 1/n."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.full((n,), 1.0 / n))

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        out = xs[0] * self.weights[0]
        for i in range(1, len(xs)):
            out = out + xs[i] * self.weights[i]
        return out


def _factorized(cin: int, cout: int, k: int) -> nn.Sequential:
    """A k×k×k receptive field as (1,1,k) → (1,k,1) → (k,1,1) convolutions."""
    return nn.Sequential(_conv_bn(cin, cout, (1, 1, k)), _conv_bn(cout, cout, (1, k, 1)),
                         _conv_bn(cout, cout, (k, 1, 1)))


class RC1(nn.Module):
    """After block 2. Branches: 1×1×1; 1×1×1 → 3×3×3; 1×1×1 → 3×3×3 → 3×3×3 (a 5×5×5 field);
    global average pooling. Adaptive weighted sum, added to the input (residual)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = max(channels // reduction, 4)
        self.b1 = _conv_bn(channels, channels, 1)
        self.b2 = nn.Sequential(_conv_bn(channels, mid, 1), _conv_bn(mid, channels, 3))
        self.b3 = nn.Sequential(_conv_bn(channels, mid, 1), _conv_bn(mid, mid, 3),
                                _conv_bn(mid, channels, 3))
        self.b4 = _GlobalBranch(channels)
        self.fuse = _WeightedSum(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fuse([self.b1(x), self.b2(x), self.b3(x), self.b4(x)])


class RC2(nn.Module):
    """After block 3. Branches: 1×1×1; global pooling; 1×1×1 → factorized 7 (1×1×7, 1×7×1,
    7×1×1); 1×1×1 → two factorized-7 stacks (the paper's stand-in for 9×9×9)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = max(channels // reduction, 4)
        self.b1 = _conv_bn(channels, channels, 1)
        self.b2 = _GlobalBranch(channels)
        self.b3 = nn.Sequential(_conv_bn(channels, mid, 1), _factorized(mid, mid, 7),
                                _conv_bn(mid, channels, 1))
        self.b4 = nn.Sequential(_conv_bn(channels, mid, 1), _factorized(mid, mid, 7),
                                _factorized(mid, mid, 7), _conv_bn(mid, channels, 1))
        self.fuse = _WeightedSum(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fuse([self.b1(x), self.b2(x), self.b3(x), self.b4(x)])


class RC3(nn.Module):
    """After block 4. Eight outputs from four branches (Eq. 3.9):
    branch 1: 1×1×1 → factorized 3 → three directional convs (1×1×3, 1×3×1, 3×1×1) → 3 outputs;
    branch 2: 1×1×1 → the three directional convs → 3 outputs;
    branch 3: 1×1×1 → 1 output; branch 4: global pooling → 1 output."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = max(channels // reduction, 4)
        self.b1_stem = nn.Sequential(_conv_bn(channels, mid, 1), _factorized(mid, mid, 3))
        self.b2_stem = _conv_bn(channels, mid, 1)
        kernels = ((1, 1, 3), (1, 3, 1), (3, 1, 1))
        self.b1_dirs = nn.ModuleList(_conv_bn(mid, channels, k) for k in kernels)
        self.b2_dirs = nn.ModuleList(_conv_bn(mid, channels, k) for k in kernels)
        self.b3 = _conv_bn(channels, channels, 1)
        self.b4 = _GlobalBranch(channels)
        self.fuse = _WeightedSum(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1, s2 = self.b1_stem(x), self.b2_stem(x)
        outs = [d(s1) for d in self.b1_dirs] + [d(s2) for d in self.b2_dirs]
        outs += [self.b3(x), self.b4(x)]
        return x + self.fuse(outs)


class ChannelAttention3D(nn.Module):
    """Eq. 3.10: two branches, global average and global max pooling, each
    1×1×1 conv (C→C/r) → BN → ReLU → 1×1×1 conv (C/r→C) → BN; summed, sigmoid."""

    def __init__(self, channels: int, r: int = 4) -> None:
        super().__init__()
        mid = max(channels // r, 4)

        def branch() -> nn.Sequential:
            # BN on a pooled 1×1×1 map (as Eq. 3.10 says) needs a batch of >= 2 in training.
            return nn.Sequential(nn.Conv3d(channels, mid, 1, bias=False), nn.BatchNorm3d(mid),
                                 nn.ReLU(inplace=True), nn.Conv3d(mid, channels, 1, bias=False),
                                 nn.BatchNorm3d(channels))

        self.avg_branch = branch()
        self.max_branch = branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.avg_branch(F.adaptive_avg_pool3d(x, 1)) +
                             self.max_branch(F.adaptive_max_pool3d(x, 1)))


class AFFA(nn.Module):
    """Attention feature fusion, two fusion operations (Eq. 3.11 applied twice):
    Z1 = M1(X+Y)·X + (1−M1(X+Y))·Y;  Z = M2(Z1)·X + (1−M2(Z1))·Y."""

    def __init__(self, channels: int, r: int = 4) -> None:
        super().__init__()
        self.cam1 = ChannelAttention3D(channels, r)
        self.cam2 = ChannelAttention3D(channels, r)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m1 = self.cam1(x + y)
        z1 = m1 * x + (1 - m1) * y
        m2 = self.cam2(z1)
        return m2 * x + (1 - m2) * y


class _Up(nn.Module):
    """Transposed conv (kernel 2, stride 2) from a deeper block to the shallower block's channels,
    cropped to its (T, H, W) (stride-2 blocks round up, so 2× is never short)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose3d(cin, cout, 2, 2, bias=False)
        self.bn = nn.BatchNorm3d(cout)

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.deconv(x)))
        t, h, w = like.shape[2:]
        if y.shape[2] < t or y.shape[3] < h or y.shape[4] < w:
            y = F.interpolate(y, size=(t, h, w), mode="nearest")
        return y[:, :, :t, :h, :w]


class _DiscriminativeHead(nn.Module):
    """Global average pooling, then the two fully connected layers of Fig. 9."""

    def __init__(self, channels: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3, 4)))


class MultiScale3DResNet50(nn.Module):
    """(N, C, T, H, W) flow stack (paper: C=3, T=16, H=W=134) → (N, num_classes) logits.

    ``forward_heads`` returns the four outputs' logits (X5, AFFA(X5↑, X4), AFFA(X4↑, X3),
    AFFA(X3↑, X2)); train with a cross-entropy on each. ``forward`` is the discriminative
    selection: per sample, the logits of the head whose softmax is most confident
    (``select="confidence"``), or the mean of the four heads' logits (``select="mean"``).

    ``width`` is the bottleneck width of block 2 (64 in ResNet50; 8 for a thin test variant);
    ``layers`` the bottleneck counts of blocks 2–5.
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 3, width: int = 64,
                 layers: tuple[int, int, int, int] = (3, 4, 6, 3), head_hidden: int = 256,
                 dropout: float = 0.5, select: str = "confidence", use_attention: bool = True,
                 use_multiscale: bool = True) -> None:
        super().__init__()
        if select not in ("confidence", "mean"):
            raise ValueError(f"select must be 'confidence' or 'mean', got {select!r}")
        self.select = select
        self.block1 = nn.Sequential(
            nn.Conv3d(in_channels, width, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False),
            nn.BatchNorm3d(width), nn.ReLU(inplace=True), nn.MaxPool3d(3, 2, 1))
        self.attention = SpatioTemporalAttention() if use_attention else nn.Identity()
        blocks, cin = [], width
        widths = [width * 2 ** i for i in range(4)]
        for i, (w, n) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            units = []
            for j in range(n):
                units.append(Bottleneck3D(cin, w, stride if j == 0 else 1))
                cin = w * Bottleneck3D.expansion
            blocks.append(nn.Sequential(*units))
        self.block2, self.block3, self.block4, self.block5 = blocks
        chans = [w * Bottleneck3D.expansion for w in widths]  # 256, 512, 1024, 2048 at width 64
        if use_multiscale:
            self.rc1, self.rc2, self.rc3 = RC1(chans[0]), RC2(chans[1]), RC3(chans[2])
        else:
            self.rc1 = self.rc2 = self.rc3 = nn.Identity()
        self.up54, self.up43, self.up32 = (_Up(chans[3], chans[2]), _Up(chans[2], chans[1]),
                                           _Up(chans[1], chans[0]))
        self.affa54, self.affa43, self.affa32 = AFFA(chans[2]), AFFA(chans[1]), AFFA(chans[0])
        self.heads = nn.ModuleList(_DiscriminativeHead(c, head_hidden, num_classes, dropout)
                                   for c in (chans[3], chans[2], chans[1], chans[0]))

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four outputs' logits, each (N, num_classes), deepest first."""
        if x.ndim != 5:
            raise ValueError(f"expected (N, C, T, H, W), got {tuple(x.shape)}")
        x1 = self.attention(self.block1(x))
        x2 = self.rc1(self.block2(x1))
        x3 = self.rc2(self.block3(x2))
        x4 = self.rc3(self.block4(x3))
        x5 = self.block5(x4)
        outs = [x5, self.affa54(self.up54(x5, x4), x4), self.affa43(self.up43(x4, x3), x3),
                self.affa32(self.up32(x3, x2), x2)]
        return [head(o) for head, o in zip(self.heads, outs)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack(self.forward_heads(x), dim=1)  # (N, 4, K)
        if self.select == "mean":
            return logits.mean(dim=1)
        confidence = torch.softmax(logits, dim=-1).amax(dim=-1)  # (N, 4)
        best = confidence.argmax(dim=1)  # (N,)
        index = best[:, None, None].expand(-1, 1, logits.shape[-1])
        return torch.gather(logits, 1, index).squeeze(1)
