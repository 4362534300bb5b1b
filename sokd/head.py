"""DAM: the shared interest-detection head of docs/algorithm.md §4."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _validation as check

# CenterNet's prior: heat starts near 0.1, so early peaks are not all saturated.
HEAT_BIAS_INIT = -2.19
# Boxes start 3 positions wide and high (a 3 x 3 box around each peak, the size of the peak
# window) and can never shrink below one position: docs/algorithm.md §6, departure 10.
MIN_BOX_SIZE = 1.0
INIT_BOX_SIZE = 3.0

HeadPrecision = Literal["float32", "bfloat16", "float16"]
HEAD_PRECISIONS = ("float32", "bfloat16", "float16")


class HeadOutput(NamedTuple):
    heat: torch.Tensor  # N x heat_channels x H x W, in (0, 1)
    wh: torch.Tensor  # N x 2 x H x W, box width and height, > MIN_BOX_SIZE
    offset: torch.Tensor  # N x 2 x H x W, centre offset (x, y) within the cell, in (0, 1)

    def concatenated(self) -> torch.Tensor:
        return torch.cat((self.heat, self.wh, self.offset), dim=1)


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


class InterestHead(nn.Module):
    """Three branches (heat, wh, offset), each conv3x3(C -> h) -> ReLU -> conv1x1(h -> out):

        heat = sigmoid(.),  wh = MIN_BOX_SIZE + softplus(.),  offset = sigmoid(.)

    The three 3x3 convolutions run as one convolution with 3h outputs, and the three 1x1
    convolutions as one block-diagonal 1x1 convolution: the same math as three separate
    branches, with one GEMM each instead of three.

    Args:
        channels: C, the channels of the input map.
        heat_channels: heat outputs (the authors' code uses one per class; default 1).
        hidden_channels: h, the width of each branch; default C (the authors' width).
        precision: "float32", or "bfloat16"/"float16" to run the convolutions under autocast;
            the outputs are at least float32 (the DAM loss and the peak decoding stay float32).

    Shapes: x is N x C x H x W (any floating dtype); the outputs are N x {heat_channels, 2, 2}
    x H x W, float32 (float64 for a float64 head). Gradients reach x and every weight.
    docs/algorithm.md §4.

    Unlike the authors' head, wh and offset cannot die: a ReLU there let the consistency loss
    drive both to exactly 0 (every box one position, many mutual maps empty) with no gradient
    to come back (docs/algorithm.md §6, departures 10 and 11).
    """

    def __init__(
        self,
        channels: int,
        heat_channels: int = 1,
        *,
        hidden_channels: int | None = None,
        precision: HeadPrecision = "float32",
    ) -> None:
        super().__init__()
        self.channels = check.positive_int(channels, "channels")
        self.heat_channels = check.positive_int(heat_channels, "heat_channels")
        hidden = channels if hidden_channels is None else hidden_channels
        self.hidden_channels = check.positive_int(hidden, "hidden_channels")
        self.precision = check.choice(precision, "precision", HEAD_PRECISIONS)
        self.hidden = nn.Conv2d(channels, 3 * self.hidden_channels, kernel_size=3, padding=1)
        bound = 1 / math.sqrt(self.hidden_channels)

        def branch(outputs: int, name: str) -> None:
            shape = (outputs, self.hidden_channels)
            weight = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
            bias = nn.Parameter(torch.empty(outputs).uniform_(-bound, bound))
            self.register_parameter(f"{name}_weight", weight)
            self.register_parameter(f"{name}_bias", bias)

        branch(heat_channels, "heat")
        branch(2, "wh")
        branch(2, "offset")
        nn.init.constant_(self.heat_bias, HEAT_BIAS_INIT)
        nn.init.constant_(self.wh_bias, _inverse_softplus(INIT_BOX_SIZE - MIN_BOX_SIZE))
        nn.init.zeros_(self.offset_bias)  # centres start mid-cell

    def forward(self, x: torch.Tensor) -> HeadOutput:
        check.tensor(x, "x", 4, "N x C x H x W")
        if x.shape[1] != self.channels:
            raise ValueError(f"x must have {self.channels} channels, got {x.shape[1]}")
        if self.precision == "float32":
            out = self._pre_activations(x.to(self.hidden.weight.dtype))
        else:
            dtype = getattr(torch, self.precision)
            if x.device.type == "cpu" and dtype is torch.float16:
                raise ValueError(
                    "precision='float16' needs a CUDA device; use 'bfloat16' on the CPU"
                )
            with torch.autocast(x.device.type, dtype=dtype):
                out = self._pre_activations(x)
        # At least float32 from here on: the DAM loss and the peak decoding read these maps.
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        heat, wh, offset = out.split((self.heat_channels, 2, 2), dim=1)
        return HeadOutput(torch.sigmoid(heat), MIN_BOX_SIZE + F.softplus(wh), torch.sigmoid(offset))

    def _pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.hidden(x))
        weight = torch.block_diag(self.heat_weight, self.wh_weight, self.offset_weight)
        bias = torch.cat((self.heat_bias, self.wh_bias, self.offset_bias))
        return F.conv2d(hidden, weight[:, :, None, None].to(hidden.dtype), bias.to(hidden.dtype))
