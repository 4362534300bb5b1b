"""Reference feature augmentation: each primitive applied in turn, in the accumulation type."""

import torch
import torch.nn.functional as F

from ..augment_ops import (
    AFFINE_OPS,
    CHANNEL_DROP,
    CHANNEL_SHUFFLE,
    CUTOUT,
    NOISE,
    affine_matrix,
)
from .common import accumulation_dtype


def _affine(x, op, value):
    theta = affine_matrix(op, value).to(x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _cutout(x, value, centres):
    _, _, h, w = x.shape
    box_h = torch.floor(value * h)
    box_w = torch.floor(value * w)
    top = centres[:, 0:1] - torch.floor(box_h / 2)
    left = centres[:, 1:2] - torch.floor(box_w / 2)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + box_h)
    in_cols = (cols >= left) & (cols < left + box_w)
    inside = in_rows[:, :, None] & in_cols[:, None, :]
    return x.masked_fill(inside[:, None], 0.0)


def _noise(x, value, seed):
    generator = torch.Generator(device=x.device).manual_seed(seed)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + value.to(x.dtype) * eps


def _channel_shuffle(x, permutation):
    index = permutation[:, :, None, None].expand_as(x)
    return torch.gather(x, 1, index)


def _channel_drop(x, value, uniforms):
    return x.masked_fill((uniforms < value)[:, :, None, None], 0.0)


def feature_augment(x, op_ids, values, draws):
    """Apply op_ids in order. `values` are the mapped magnitudes v (float32, one per op) and
    `draws` the per-position random draws of `augment_ops.draw_randomness`."""
    out = x.to(accumulation_dtype(x.dtype))
    for op, value, draw in zip(op_ids, values.unbind(0), draws):
        if op in AFFINE_OPS:
            out = _affine(out, op, value)
        elif op == CUTOUT:
            out = _cutout(out, value, draw)
        elif op == NOISE:
            out = _noise(out, value, draw)
        elif op == CHANNEL_SHUFFLE:
            out = _channel_shuffle(out, draw)
        elif op == CHANNEL_DROP:
            out = _channel_drop(out, value, draw)
    return out.to(x.dtype)
