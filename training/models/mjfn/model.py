"""MJFN: multi-scale joint feature network (Li, Wei, Wang, Zhou; CVM 2021, 7(3): 407-417).
See README.md."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MJFN", "JointFeatureModule", "FUSIONS"]

FUSIONS = ("backbone", "average", "softmax")


def _classifier(in_features: int, hidden: int, num_classes: int, dropout: float,
                layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = in_features
    for _ in range(layers - 1):
        mods += [nn.Dropout(dropout), nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    mods.append(nn.Linear(width, num_classes))
    return nn.Sequential(*mods)


class JointFeatureModule(nn.Module):
    """JFM (Fig. 3, Eqs. 7-9): 1×1 conv on layer l and on layer 5 (Eq. 7), element-wise sum
    (Eq. 8), ReLU, 3×3/2 max-pool, a fully connected layer, then the class layer W (Eq. 9).
    Returns logits; Eq. 9's softmax is applied by the fusion."""

    def __init__(self, c_low: int, c5: int, pooled: int, hidden: int, num_classes: int,
                 dropout: float) -> None:
        super().__init__()
        self.proj_low = nn.Conv2d(c_low, c5, 1)
        self.proj_5 = nn.Conv2d(c5, c5, 1)
        self.pool = nn.MaxPool2d(3, 2)
        self.fc = _classifier(c5 * pooled * pooled, hidden, num_classes, dropout, layers=2)

    def forward(self, low: torch.Tensor, x5: torch.Tensor) -> torch.Tensor:
        m = torch.relu(self.proj_low(low) + self.proj_5(x5))
        return self.fc(torch.flatten(self.pool(m), 1))


class MJFN(nn.Module):
    """(N, 3, 224, 224) colour-coded onset→apex flow → (N, num_classes) logits.

    Backbone (Table 1): conv 11×11/4 (48) → pool → conv 5×5 (128) → pool → 3× conv 3×3 (128) →
    pool → FC 256 → FC 256 → FC 3. JFMs join layers 2, 3, 4 with layer 5 (at 12×12).

    ``fusion``: "backbone" (backbone logits only; MJFN-BbN), "average" (Eq. 10: mean of the four
    softmax outputs; logits = its log, so cross-entropy on them is Eq. 12 on the averaged
    prediction; MJFN-Avg), "softmax" (Eq. 11: logits = Z, the sum of the four softmax outputs, so
    softmax(logits) is the paper's y; MJFN). In every case ``cross_entropy(forward(x), y)`` is the
    paper's training loss for that strategy. ``forward_heads`` gives the four heads' raw logits.
    With fusion="backbone" the JFMs are not built (the paper's BbN ablation removes them).
    """

    # Training on a CPU feeds it channels-last images (training.loso.train_models):
    # two-worker LOSO training measured 1.10x faster that way (benchmarks/loso.py).
    channels_last_on_cpu = True

    def __init__(self, num_classes: int = 3, in_channels: int = 3, fusion: str = "softmax",
                 dropout: float = 0.5, hidden: int = 256, input_size: int = 224) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        self.input_size = input_size
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, 48, 11, 4), relu())
        self.pool1 = nn.MaxPool2d(3, 2)
        self.conv2 = nn.Sequential(nn.Conv2d(48, 128, 5, 1, 2), relu())
        self.pool2 = nn.MaxPool2d(3, 2)
        self.conv3 = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1), relu())
        self.conv4 = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1), relu())
        self.conv5 = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1), relu())
        self.pool3 = nn.MaxPool2d(3, 2)
        s = (input_size - 11) // 4 + 1          # 54
        s = (s - 3) // 2 + 1                     # 26 (conv2 keeps it)
        s5 = (s - 3) // 2 + 1                    # 12: layers 3-5, and layer 2 after its pool
        pooled = (s5 - 3) // 2 + 1               # 5
        self.classifier = _classifier(128 * pooled * pooled, hidden, num_classes, dropout,
                                      layers=3)
        if fusion != "backbone":
            self.jfms = nn.ModuleList(JointFeatureModule(128, 128, pooled, hidden, num_classes,
                                                         dropout) for _ in range(3))
        else:
            self.jfms = None

    def _layers(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.ndim != 4 or x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ValueError(f"MJFN expects (N, C, {self.input_size}, {self.input_size}), got "
                             f"{tuple(x.shape)}")
        x2 = self.pool2(self.conv2(self.pool1(self.conv1(x))))  # layer 2, pooled to 12×12
        x3 = self.conv3(x2)
        x4 = self.conv4(x3)
        x5 = self.conv5(x4)
        return x2, x3, x4, x5

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw logits: [backbone, JFM(2,5), JFM(3,5), JFM(4,5)] (backbone only if fusion is
        "backbone")."""
        x2, x3, x4, x5 = self._layers(x)
        outs = [self.classifier(torch.flatten(self.pool3(x5), 1))]
        if self.jfms is not None:
            outs += [jfm(low, x5) for jfm, low in zip(self.jfms, (x2, x3, x4))]
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.forward_heads(x)
        if self.fusion == "backbone":
            return outs[0]
        z = torch.stack([torch.softmax(o, dim=-1) for o in outs], dim=0).sum(dim=0)
        if self.fusion == "average":
            return torch.log(z / len(outs))
        return z
