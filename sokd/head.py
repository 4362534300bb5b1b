"""DAM: the shared interest-detection head of SPEC section 4."""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _validation as check

# CenterNet's prior: heat starts near 0.1, so early peaks are not all saturated.
HEAT_BIAS_INIT = -2.19


class HeadOutput(NamedTuple):
    heat: torch.Tensor  # N x heat_channels x H x W, in (0, 1)
    wh: torch.Tensor  # N x 2 x H x W, box width and height, >= 0
    offset: torch.Tensor  # N x 2 x H x W, centre offset (x, y), >= 0

    def concatenated(self):
        return torch.cat((self.heat, self.wh, self.offset), dim=1)


class InterestHead(nn.Module):
    """Three branches (heat, wh, offset), each conv3x3 -> ReLU -> conv1x1.

    The three 3x3 convolutions run as one convolution with 3C outputs, and the three 1x1
    convolutions as one block-diagonal (grouped) 1x1 convolution: the same math as three
    separate branches, with one GEMM each instead of three.
    """

    def __init__(self, channels, heat_channels=1):
        super().__init__()
        self.channels = check.positive_int(channels, "channels")
        self.heat_channels = check.positive_int(heat_channels, "heat_channels")
        self.hidden = nn.Conv2d(channels, 3 * channels, kernel_size=3, padding=1)
        bound = 1 / math.sqrt(channels)

        def branch(outputs, name):
            weight = nn.Parameter(torch.empty(outputs, channels).uniform_(-bound, bound))
            bias = nn.Parameter(torch.empty(outputs).uniform_(-bound, bound))
            self.register_parameter(f"{name}_weight", weight)
            self.register_parameter(f"{name}_bias", bias)

        branch(heat_channels, "heat")
        branch(2, "wh")
        branch(2, "offset")
        nn.init.constant_(self.heat_bias, HEAT_BIAS_INIT)

    def forward(self, x):
        check.tensor(x, "x", 4, "N x C x H x W")
        if x.shape[1] != self.channels:
            raise ValueError(f"x must have {self.channels} channels, got {x.shape[1]}")
        hidden = F.relu(self.hidden(x))
        weight = torch.block_diag(self.heat_weight, self.wh_weight, self.offset_weight)
        bias = torch.cat((self.heat_bias, self.wh_bias, self.offset_bias))
        out = F.conv2d(hidden, weight[:, :, None, None].to(hidden.dtype), bias.to(hidden.dtype))
        heat, wh, offset = out.split((self.heat_channels, 2, 2), dim=1)
        return HeadOutput(torch.sigmoid(heat), F.relu(wh), F.relu(offset))
