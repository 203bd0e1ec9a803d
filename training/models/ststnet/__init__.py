"""STSTNet: Shallow Triple Stream Three-dimensional CNN (Liong et al., FG 2019). See README.md."""

from __future__ import annotations

import torch
from torch import nn

from training.models.registry import register_model

__all__ = ["STSTNet"]


@register_model("ststnet")
class STSTNet(nn.Module):
    """Three parallel 3×3 conv streams (3, 5, 8 channels) on a (u, v, strain) map.

    Input (N, 3, 28, 28) float32 (normalised maps), output (N, num_classes) logits.
    """

    # Training on a CPU feeds it channels-last images (training.loso.train_models):
    # two-worker LOSO training measured 1.28x faster that way (benchmarks/loso.py).
    channels_last_on_cpu = True
    # ... and sets the process to keep freed heap memory (training.loso.keeps_freed_memory):
    # its step reallocates ~40 MB of activations; with the input bank, two-worker training
    # measured 1.28-1.38x faster (benchmarks/loso.py), with the same results.
    keep_freed_memory_on_cpu = True

    def __init__(self, num_classes: int = 3, in_channels: int = 3,
                 stream_channels: tuple[int, ...] = (3, 5, 8), input_size: int = 28,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.input_size = input_size
        self.stream_channels = tuple(stream_channels)
        width = sum(self.stream_channels)
        # The streams share their input and every later op is per channel, so the three 3x3
        # convs are one conv whose output channels are the streams side by side: the same
        # function as three modules, a third of the kernel launches (which dominate on CPU).
        self.conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        # 28 -> 10 with kernel 3, stride 3, padding 1; then 10 -> 5 by the 2x2 average.
        self.max_pool = nn.MaxPool2d(kernel_size=3, stride=3, padding=1)
        self.avg_pool = nn.AvgPool2d(kernel_size=2, stride=2)
        side = ((input_size + 2 - 3) // 3 + 1) // 2
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ValueError(
                f"STSTNet expects (N, C, {self.input_size}, {self.input_size}), got "
                f"{tuple(x.shape)}"
            )
        # The paper's order: ReLU before BatchNorm.
        feats = self.avg_pool(self.max_pool(self.bn(torch.relu(self.conv(x)))))
        return self.fc(self.dropout(torch.flatten(feats, 1)))
