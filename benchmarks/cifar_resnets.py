"""CIFAR ResNets in the style of RepDistiller's `resnet32x4` (teacher) and `resnet8x4` (student).

Depth 6n + 2 with basic blocks: a 3x3 stem of 32 channels, then three stages of n blocks at
64 channels @ 32x32, 128 @ 16x16 and 256 @ 8x8, average pooling and a linear classifier.
`forward` returns the output of every stage with the logits, so a benchmark can take the hint
at 128 ch @ 16x16 (stage 2) or 256 ch @ 8x8 (stage 3), after the block's ReLU as
RepDistiller does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images with stage widths `widths` (stem, stage 1, 2, 3)."""

    def __init__(
        self, depth: int, widths: tuple[int, int, int, int] = (32, 64, 128, 256), classes: int = 100
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, inputs = [], widths[0]
        for index, outputs in enumerate(widths[1:]):
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(blocks):
                layers.append(BasicBlock(inputs, outputs, stride if block == 0 else 1))
                inputs = outputs
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: N x 3 x 32 x 32. Returns ([stage 1, stage 2, stage 3 outputs], N x classes)."""
        out = F.relu(self.bn1(self.conv1(x)))
        features = []
        for stage in self.stages:
            out = stage(out)
            features.append(out)
        return features, self.fc(out.mean(dim=(2, 3)))


def resnet32x4(classes: int = 100, widths: tuple[int, int, int, int] = (32, 64, 128, 256)):
    """RepDistiller's resnet32x4: 5 blocks per stage."""
    return CifarResNet(32, widths, classes)


def resnet8x4(classes: int = 100, widths: tuple[int, int, int, int] = (32, 64, 128, 256)):
    """RepDistiller's resnet8x4: 1 block per stage."""
    return CifarResNet(8, widths, classes)
