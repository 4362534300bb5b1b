"""The nine feature-augmentation primitives of docs/algorithm.md §1, and their random draws.

The draws are made here, once, from the caller's generator, and handed to whichever backend
runs the op. That is what makes every backend produce the same output for the same draws.
Gaussian noise is the exception: only its seed is drawn here, and each backend expands the
seed with its own counter-based generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Union

import torch


class Primitive(NamedTuple):
    name: str
    low: float
    high: float


PRIMITIVES = (
    Primitive("shear_x", -0.3, 0.3),
    Primitive("shear_y", -0.3, 0.3),
    Primitive("translate_x", -0.45, 0.45),
    Primitive("translate_y", -0.45, 0.45),
    Primitive("rotate", -30.0, 30.0),
    Primitive("cutout", 0.0, 0.2),
    Primitive("noise", 0.0, 0.1),
    Primitive("channel_shuffle", 0.0, 1.0),
    Primitive("channel_drop", 0.0, 0.5),
)
SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE = range(5)
CUTOUT, NOISE, CHANNEL_SHUFFLE, CHANNEL_DROP = range(5, 9)
AFFINE_OPS = frozenset((SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE))
NUM_PRIMITIVES = len(PRIMITIVES)

_NOISE_SEED_BOUND = 2**62

# One op's random draw: a tensor, a noise seed, or None for a deterministic op. (Union, not |:
# this alias is evaluated at import, and the package supports Python 3.9.)
Draw = Union[torch.Tensor, int, None]


def op_values(magnitudes: torch.Tensor, op_ids: Sequence[int]) -> torch.Tensor:
    """Clamp magnitudes to [0, 1] and map each to its op's range: v = lo + m * (hi - lo)."""
    low = torch.tensor([PRIMITIVES[op].low for op in op_ids], dtype=torch.float32)
    high = torch.tensor([PRIMITIVES[op].high for op in op_ids], dtype=torch.float32)
    low, high = low.to(magnitudes.device), high.to(magnitudes.device)
    return low + magnitudes.detach().float().clamp(0.0, 1.0) * (high - low)


def affine_matrix(op: int, value: torch.Tensor) -> torch.Tensor:
    """The 2x3 theta of an affine op (output -> input coordinates), as a float32 tensor."""
    one, zero = torch.ones_like(value), torch.zeros_like(value)
    if op == SHEAR_X:
        rows = ((one, value, zero), (zero, one, zero))
    elif op == SHEAR_Y:
        rows = ((one, zero, zero), (value, one, zero))
    elif op == TRANSLATE_X:
        rows = ((one, zero, 2 * value), (zero, one, zero))
    elif op == TRANSLATE_Y:
        rows = ((one, zero, zero), (zero, one, 2 * value))
    elif op == ROTATE:
        angle = value * (math.pi / 180.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rows = ((cos, sin, zero), (-sin, cos, zero))
    else:
        raise ValueError(f"op {op} is not an affine op")
    return torch.stack([torch.stack(row) for row in rows])


def draw_randomness(
    op_ids: Sequence[int],
    shape: Sequence[int],
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> list[Draw]:
    """One entry per op position: cutout centres (N x 2 int64, as (y, x)), a channel
    permutation per sample (N x C int64), channel-drop uniforms (N x C float32), a noise seed
    (a Python int), or None for the deterministic ops."""
    n, c, h, w = shape
    draw_device = generator.device if generator is not None else torch.device(device)
    # generator=None is left out rather than passed: the random ops' generator overloads do
    # not take symbolic sizes, which torch.compile uses once the batch size changes.
    random = {"device": draw_device}
    if generator is not None:
        random["generator"] = generator
    draws = []
    for op in op_ids:
        if op == CUTOUT:
            ys = torch.randint(0, h, (n,), **random)
            xs = torch.randint(0, w, (n,), **random)
            draws.append(torch.stack((ys, xs), dim=1).to(device))
        elif op == CHANNEL_SHUFFLE:
            keys = torch.rand((n, c), dtype=torch.float32, **random)
            draws.append(torch.argsort(keys, dim=1).to(device))
        elif op == CHANNEL_DROP:
            # float32 whatever torch.get_default_dtype() is: the kernels read float32 draws.
            draws.append(torch.rand((n, c), dtype=torch.float32, **random).to(device))
        elif op == NOISE:
            seed = torch.randint(0, _NOISE_SEED_BOUND, (1,), **random)
            draws.append(int(seed.item()))
        else:
            draws.append(None)
    return draws
