"""MCNet (Chang et al., Mathematics 2025): MobileNetV3-Small trunk, Residual KAN CBAM Block,
Multi-Channel Cosine Fusion Module. See README.md for what the paper leaves unsaid."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MCNet", "MobileNetV3SmallTrunk", "ChebyshevKAN1x1", "CBAM", "RKCB", "MCCFM"]


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class SqueezeExcite(nn.Module):
    """MobileNetV3 squeeze-excite: squeeze to exp/4 (multiple of 8), ReLU, hard-sigmoid gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = _make_divisible(channels / 4)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV3 bneck: (1×1 expand) → k×k depthwise → (SE) → 1×1 project; residual if the
    shape is kept."""

    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, act: str,
                 stride: int) -> None:
        super().__init__()
        Act = nn.Hardswish if act == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers += [nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp), Act()]
        layers += [nn.Conv2d(exp, exp, k, stride, k // 2, groups=exp, bias=False),
                   nn.BatchNorm2d(exp), Act()]
        if se:
            layers.append(SqueezeExcite(exp))
        layers += [nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res else y


# MobileNetV3-Small (Howard et al., ICCV 2019, Table 2): kernel, expansion, out, SE, act, stride.
_SMALL_BNECKS = (
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
)


class MobileNetV3SmallTrunk(nn.Module):
    """The MCNet layer table up to RKCB: 3×224×224 → stem 16×112×112 → bnecks 96×7×7 →
    1×1 conv 576×7×7 (BN, Hardswish)."""

    out_channels = 576

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(16), nn.Hardswish())
        blocks, cin = [], 16
        for k, exp, cout, se, act, s in _SMALL_BNECKS:
            blocks.append(InvertedResidual(cin, k, exp, cout, se, act, s))
            cin = cout
        self.bnecks = nn.Sequential(*blocks)
        self.last = nn.Sequential(nn.Conv2d(cin, 576, 1, bias=False), nn.BatchNorm2d(576),
                                  nn.Hardswish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.bnecks(self.stem(x)))


def chebyshev_basis(x: torch.Tensor, degree: int) -> torch.Tensor:
    """T_0..T_degree of ``x`` (values in [-1, 1]) stacked on a new dim 2: (N, C, D+1, H, W).

    Three-term recurrence T_{n+1} = 2x T_n − T_{n−1}: only multiplies and adds, so it exports
    to ONNX / torch.export without custom ops.
    """
    ts = [torch.ones_like(x), x]
    for _ in range(2, degree + 1):
        ts.append(2 * x * ts[-1] - ts[-2])
    return torch.stack(ts[: degree + 1], dim=2)


class ChebyshevKAN1x1(nn.Module):
    """A pointwise (1×1) KAN layer: y_j = Σ_i [ w_ij · silu(x_i) + Σ_d c_ijd · T_d(tanh x_i) ].

    Every input→output edge carries its own learnable univariate function (a degree-``degree``
    Chebyshev expansion of the squashed input) plus the SiLU "base" term of the original KAN.
    Input (N, Cin, H, W) → (N, Cout, H, W). Applied per pixel, i.e. a KAN convolution with a 1×1
    kernel; spatial mixing is left to the depthwise conv before it (mobile-style).
    """

    def __init__(self, cin: int, cout: int, degree: int = 3) -> None:
        super().__init__()
        if degree < 1:
            raise ValueError(f"degree must be >= 1, got {degree}")
        self.degree = degree
        self.base = nn.Conv2d(cin, cout, 1, bias=False)
        # The (D+1)·Cin Chebyshev features per pixel are mixed by one 1×1 conv: c_ijd as weights.
        self.spline = nn.Conv2d(cin * (degree + 1), cout, 1, bias=True)
        nn.init.normal_(self.spline.weight, 0.0, 1.0 / math.sqrt(cin * (degree + 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        basis = chebyshev_basis(torch.tanh(x), self.degree).reshape(n, c * (self.degree + 1), h, w)
        return self.base(F.silu(x)) + self.spline(basis)


class CBAM(nn.Module):
    """Convolutional block attention (Woo et al., ECCV 2018): channel attention from avg- and
    max-pooled descriptors through a shared MLP, then spatial attention from the channel-wise
    avg and max maps through a 7×7 conv."""

    def __init__(self, channels: int, reduction: int = 16, kernel: int = 7) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(),
                                 nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ca = torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) +
                           self.mlp(F.adaptive_max_pool2d(x, 1)))
        x = x * ca
        sa = torch.sigmoid(self.spatial(torch.cat([x.mean(1, keepdim=True),
                                                   x.amax(1, keepdim=True)], dim=1)))
        return x * sa


class RKCB(nn.Module):
    """Residual KAN CBAM Block, 576×7×7 → 1152×7×7.

    use_rkcb=True:  depthwise 3×3 (BN, HS) → projection → BN → CBAM, plus a 1×1-conv+BN shortcut,
                    then Hardswish.
    use_rkcb=False: the projection alone (BN, HS): no residual, no CBAM (ablation row 4).
    use_kan selects the projection: Chebyshev KAN 1×1 (True) or a plain 1×1 conv (ablation row 3).
    """

    def __init__(self, cin: int = 576, cout: int = 1152, use_kan: bool = True,
                 use_rkcb: bool = True, kan_degree: int = 3) -> None:
        super().__init__()
        self.use_rkcb = use_rkcb
        proj = ChebyshevKAN1x1(cin, cout, kan_degree) if use_kan else nn.Conv2d(cin, cout, 1,
                                                                                 bias=False)
        if use_rkcb:
            self.dw = nn.Sequential(nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False),
                                    nn.BatchNorm2d(cin), nn.Hardswish())
            self.proj = nn.Sequential(proj, nn.BatchNorm2d(cout))
            self.cbam = CBAM(cout)
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                          nn.BatchNorm2d(cout))
        else:
            self.proj = nn.Sequential(proj, nn.BatchNorm2d(cout))
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_rkcb:
            return self.act(self.proj(x))
        return self.act(self.cbam(self.proj(self.dw(x))) + self.shortcut(x))


class MCCFM(nn.Module):
    """Multi-Channel Cosine Fusion Module: multi-head ("multi-channel") attention over the 7×7
    tokens of the feature map whose affinities are cosine similarities between Query and Key
    tokens, scaled by a learnable per-head temperature; residual; then the tokens are fused into
    one vector by attention pooling with a learned query scored the same (cosine) way.

    (N, C, H, W) → (N, C).
    """

    def __init__(self, channels: int = 1152, heads: int = 8, max_logit_scale: float = 100.0
                 ) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        # Cosine similarity is bounded in [-1, 1]; a learnable scale (init 10) lets softmax sharpen.
        self.logit_scale = nn.Parameter(torch.full((heads, 1, 1), math.log(10.0)))
        self.max_log_scale = math.log(max_logit_scale)
        self.pool_query = nn.Parameter(torch.randn(1, 1, channels) * 0.02)
        self.pool_key = nn.Linear(channels, channels)
        self.pool_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.out_norm = nn.LayerNorm(channels)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        n, l, c = t.shape
        return t.reshape(n, l, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (N, L, C)
        q, k, v = self.qkv(self.norm(tokens)).chunk(3, dim=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        scale = torch.exp(torch.clamp(self.logit_scale, max=self.max_log_scale))
        attn = torch.softmax(scale * (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(
            -2, -1)), dim=-1)
        fused = (attn @ v).transpose(1, 2).reshape(n, h * w, c)
        tokens = tokens + self.proj(fused)
        keys = F.normalize(self.pool_key(tokens), dim=-1)
        score = torch.exp(torch.clamp(self.pool_scale, max=self.max_log_scale)) * (
            keys @ F.normalize(self.pool_query, dim=-1).transpose(1, 2))  # (N, L, 1)
        pooled = (torch.softmax(score, dim=1) * tokens).sum(dim=1)
        return self.out_norm(pooled)


class MCNet(nn.Module):
    """MCNet: (N, 3, 224, 224) colour-coded (magnified, AU-masked) flow → (N, num_classes) logits.

    Switches for the paper's ablation table (the OMAM/OAUM rows are input preprocessing, see
    ``realtime_mer.input_kinds``): ``use_kan`` (KAN vs plain 1×1 projection in RKCB),
    ``use_rkcb`` (residual+CBAM block vs bare projection), ``use_mccfm`` (cosine fusion vs global
    average pooling).
    """

    # Training on a CPU feeds it channels-last images (training.loso.train_models):
    # two-worker LOSO training measured 1.21x faster that way (benchmarks/loso.py).
    channels_last_on_cpu = True

    def __init__(self, num_classes: int = 3, in_channels: int = 3, use_kan: bool = True,
                 use_rkcb: bool = True, use_mccfm: bool = True, kan_degree: int = 3,
                 mccfm_heads: int = 8, head_hidden: int = 1024, dropout: float = 0.2) -> None:
        super().__init__()
        self.trunk = MobileNetV3SmallTrunk(in_channels)
        self.rkcb = RKCB(576, 1152, use_kan=use_kan, use_rkcb=use_rkcb, kan_degree=kan_degree)
        self.fusion = MCCFM(1152, heads=mccfm_heads) if use_mccfm else None
        self.head = nn.Sequential(nn.Linear(1152, head_hidden), nn.Hardswish(),
                                  nn.Dropout(dropout), nn.Linear(head_hidden, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → the 1152×(H/32)×(W/32) RKCB map."""
        if x.ndim != 4:
            raise ValueError(f"MCNet expects (N, C, H, W), got {tuple(x.shape)}")
        return self.rkcb(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = self.fusion(f) if self.fusion is not None else f.mean(dim=(2, 3))
        return self.head(pooled)
