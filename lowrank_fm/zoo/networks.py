"""Architectures of the bundled reference models.

Pure ``nn.Module`` definitions, no weights and no I/O: :mod:`lowrank_fm.zoo.models` builds them by name and
loads their checkpoints.

- ``VGGSmall``: VGG-style stack of 3x3 conv + BatchNorm + ReLU blocks with max-pooling, then a small MLP.
- ``ResNetSmall``: CIFAR-style ResNet of BasicBlocks with strided 3x3 convs and 1x1 projection shortcuts.
- ``ResNetCifar``: the classic CIFAR ResNet-(6n+2) of He et al. (CVPR 2016, section 4.2): 16-32-64 channels,
  n BasicBlocks per stage, parameter-free shortcuts (option A); ResNet-20 has 0.27 M parameters, ResNet-56
  0.85 M.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["VGGSmall", "ResNetSmall", "BasicBlock", "ResNetCifar"]


class VGGSmall(nn.Module):
    """VGG-style classifier for small grey or colour images.

    Parameters
    ----------
    config : sequence of int or "M"
        Output channels of each 3x3 conv (each followed by BatchNorm and ReLU); ``"M"`` is a 2x2 max-pool.
    in_channels : int
        Channels of the input images.
    image_size : int
        Height (= width) of the input images; sets the size of the first Linear layer.
    num_classes : int
        Number of output logits.
    hidden : int
        Width of the hidden Linear layer.
    """

    def __init__(
        self,
        config: Sequence[int | str],
        *,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        hidden: int = 256,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += [
                    nn.Conv2d(channels, int(item), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(item)),
                    nn.ReLU(inplace=True),
                ]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x : (N, in_channels, image_size, image_size) -> logits (N, num_classes)."""
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity or 1x1-projection shortcut; ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, stages of BasicBlocks (stride 2 between stages), global pooling.

    Parameters
    ----------
    widths : sequence of int
        Channels of each stage; every stage after the first starts with a stride-2 block.
    blocks : int
        BasicBlocks per stage.
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128),
        *,
        blocks: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        channels = widths[0]
        for index, width in enumerate(widths):
            stage = []
            for block in range(blocks):
                stride = 2 if (index > 0 and block == 0) else 1
                stage.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x : (N, in_channels, H, W) -> logits (N, num_classes)."""
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and append zero channels, (N, C, H, W) -> (N, C', H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32 x 32 colour images: 3x3 stem (16), three stages of n BasicBlocks (16, 32, 64
    channels, stride 2 between stages), global average pooling, one Linear layer.

    depth : 6n + 2 (20, 32, 44, 56, 110).
    """

    def __init__(self, depth: int = 20, *, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNetCifar depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        channels = 16
        for index, width in enumerate((16, 32, 64)):
            stage = []
            for block in range(blocks):
                stride = 2 if (index > 0 and block == 0) else 1
                unit = BasicBlock(channels, width, stride)
                if stride != 1 or channels != width:
                    unit.shortcut = _PadShortcut(channels, width, stride)
                stage.append(unit)
                channels = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x : (N, 3, 32, 32) -> logits (N, num_classes)."""
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))
