"""Feature augmentation (docs/algorithm.md §1): a pair of primitive ops applied in one kernel.

Each output element is evaluated from the outside in. The second op says where it reads the
first op's output (four bilinear taps for an affine op, one tap for the others, a different
channel for a shuffle), and the first op's output at each of those points is computed on the
spot from the input. No intermediate map is stored, and two affine ops compose exactly as
bilinear-of-bilinear reads, the same as the reference's two grid_samples (align_corners=False,
zero padding): a tap of the second op that falls outside the map reads zero.

Cutout centres, channel permutations and drop uniforms arrive as tensors, so every backend
gives the same output for the same draws. Gaussian noise comes from Triton's counter-based
Philox stream keyed by (seed, flat index of the map the noise is added to), so it is never
stored and reproducible under a seed, though not equal to the reference's torch.randn.

Sequences longer than two ops (the policy only uses pairs) run as consecutive pairs, with the
intermediate maps kept in the accumulation type as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from sokd import augment_ops
from sokd.reference.common import accumulation_dtype

from ._common import accumulator_type, num_warps_for, on_device

NO_OP = -1
# One row of op parameters: the mapped magnitude v, then the 2 x 3 affine theta.
_PARAMS_PER_OP = tl.constexpr(7)

_CUTOUT = tl.constexpr(augment_ops.CUTOUT)
_NOISE = tl.constexpr(augment_ops.NOISE)
_SHUFFLE = tl.constexpr(augment_ops.CHANNEL_SHUFFLE)
_DROP = tl.constexpr(augment_ops.CHANNEL_DROP)


@triton.jit
def _source_point(params_ptr, y, x, height, width, ACC_TYPE: tl.constexpr):
    """Where an affine op's output pixel (y, x) reads its input, in pixel coordinates:
    affine_grid followed by grid_sample's unnormalisation, both with align_corners=False."""
    theta_xx = tl.load(params_ptr + 1).to(ACC_TYPE)
    theta_xy = tl.load(params_ptr + 2).to(ACC_TYPE)
    theta_x = tl.load(params_ptr + 3).to(ACC_TYPE)
    theta_yx = tl.load(params_ptr + 4).to(ACC_TYPE)
    theta_yy = tl.load(params_ptr + 5).to(ACC_TYPE)
    theta_y = tl.load(params_ptr + 6).to(ACC_TYPE)
    norm_x = (2 * x.to(ACC_TYPE) + 1) / width - 1
    norm_y = (2 * y.to(ACC_TYPE) + 1) / height - 1
    grid_x = theta_xx * norm_x + theta_xy * norm_y + theta_x
    grid_y = theta_yx * norm_x + theta_yy * norm_y + theta_y
    return ((grid_y + 1) * height - 1) / 2, ((grid_x + 1) * width - 1) / 2


@triton.jit
def _bilinear_tap(point, corner: tl.constexpr, ok, height, width):
    """Corner `corner` (0..3, row-major) of the bilinear stencil around a source point (y, x):
    its integer position, its weight, and whether it lies in the map (where `ok`)."""
    source_y, source_x = point
    top = tl.floor(source_y)
    left = tl.floor(source_x)
    below = source_y - top
    right = source_x - left
    weight_y = below if corner // 2 == 1 else 1 - below
    weight_x = right if corner % 2 == 1 else 1 - right
    tap_y = top.to(tl.int32) + corner // 2
    tap_x = left.to(tl.int32) + corner % 2
    inside = ok & (tap_y >= 0) & (tap_y < height) & (tap_x >= 0) & (tap_x < width)
    return tap_y, tap_x, weight_y * weight_x, inside


@triton.jit
def _in_cutout(draw_ptr, value, image, y, x, height, width):
    """Whether (y, x) of sample `image` lies in its cutout box of floor(v*H) x floor(v*W)."""
    box_h = tl.floor(value * height)
    box_w = tl.floor(value * width)
    top = tl.load(draw_ptr + image * 2).to(tl.float32) - tl.floor(box_h / 2)
    left = tl.load(draw_ptr + image * 2 + 1).to(tl.float32) - tl.floor(box_w / 2)
    row = y.to(tl.float32)
    col = x.to(tl.float32)
    return (row >= top) & (row < top + box_h) & (col >= left) & (col < left + box_w)


@triton.jit
def _source_channel(op, image, channel, ok, channels, OP: tl.constexpr):
    """The channel of its input that output `channel` of an op reads: another for a shuffle."""
    _, draw_ptr, _ = op
    if OP == _SHUFFLE:
        channel = tl.load(draw_ptr + image * channels + channel, mask=ok, other=0).to(tl.int64)
    return channel


@triton.jit
def _pointwise(
    value, op, image, channel, y, x, ok, sizes, OP: tl.constexpr, ACC_TYPE: tl.constexpr
):
    """Output (image, channel, y, x) of a cutout, noise or channel drop from `value`, its input
    there (any other op passes `value` on); 0 where `ok` is false. `op` is (parameter row,
    draw, noise seed) and `sizes` (channels, height, width)."""
    params_ptr, draw_ptr, seed = op
    channels, height, width = sizes
    if OP == _CUTOUT:
        magnitude = tl.load(params_ptr)
        value = tl.where(_in_cutout(draw_ptr, magnitude, image, y, x, height, width), 0.0, value)
    if OP == _NOISE:
        magnitude = tl.load(params_ptr).to(ACC_TYPE)
        flat = ((image * channels + channel) * height + y) * width + x
        value = tl.where(ok, value + magnitude * tl.randn(seed, flat).to(ACC_TYPE), 0.0)
    if OP == _DROP:
        magnitude = tl.load(params_ptr)
        uniform = tl.load(draw_ptr + image * channels + channel, mask=ok, other=1.0)
        value = tl.where(uniform < magnitude, 0.0, value)
    return value


@triton.jit
def _read(source, image, channel, y, x, ok, ACC_TYPE: tl.constexpr):
    """The input map at (image, channel, y, x) in the accumulation type; 0 where `ok` is false.
    `source` is the map's (pointer, stride_n, stride_c, stride_h, stride_w)."""
    x_ptr, stride_n, stride_c, stride_h, stride_w = source
    return tl.load(
        x_ptr
        + image * stride_n
        + channel * stride_c
        + y.to(tl.int64) * stride_h
        + x.to(tl.int64) * stride_w,
        mask=ok,
        other=0,
    ).to(ACC_TYPE)


@triton.jit
def _first_op(
    source, image, channel, y, x, ok, sizes, op, OP: tl.constexpr, AFFINE: tl.constexpr,
    ACC_TYPE: tl.constexpr,
):
    """The first op's output at (image, channel, y, x) of the map `source` (see _read); 0
    where `ok` is false (outside the map)."""
    _, height, width = sizes
    if AFFINE:
        point = _source_point(op[0], y, x, height, width, ACC_TYPE)
        value = tl.zeros(y.shape, ACC_TYPE)
        for corner in tl.static_range(4):
            tap_y, tap_x, weight, inside = _bilinear_tap(point, corner, ok, height, width)
            value += weight * _read(source, image, channel, tap_y, tap_x, inside, ACC_TYPE)
    else:
        source_channel = _source_channel(op, image, channel, ok, sizes[0], OP)
        value = _read(source, image, source_channel, y, x, ok, ACC_TYPE)
        value = _pointwise(value, op, image, channel, y, x, ok, sizes, OP, ACC_TYPE)
    return value


@triton.jit
def _feature_augment_kernel(
    x_ptr,
    out_ptr,
    params_ptr,
    draw_a_ptr,
    draw_b_ptr,
    seed_a,
    seed_b,
    total,
    channels,
    height,
    width,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    OP_A: tl.constexpr,
    OP_B: tl.constexpr,
    AFFINE_A: tl.constexpr,
    AFFINE_B: tl.constexpr,
    ACC_TYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = flat < total
    x = (flat % width).to(tl.int32)
    y = ((flat // width) % height).to(tl.int32)
    # Channels stay 64-bit: they scale the channel stride, and C * H * W may pass 2^31.
    channel = (flat // (width * height)) % channels
    image = flat // (width * height * channels)
    source = (x_ptr, stride_n, stride_c, stride_h, stride_w)
    sizes = (channels, height, width)
    op_a = (params_ptr, draw_a_ptr, seed_a)
    op_b = (params_ptr + _PARAMS_PER_OP, draw_b_ptr, seed_b)
    if AFFINE_B:
        point = _source_point(op_b[0], y, x, height, width, ACC_TYPE)
        result = tl.zeros((BLOCK,), ACC_TYPE)
        for corner in tl.static_range(4):
            tap_y, tap_x, weight, inside = _bilinear_tap(point, corner, ok, height, width)
            tap = _first_op(source, image, channel, tap_y, tap_x, inside, sizes, op_a, OP_A,
                            AFFINE_A, ACC_TYPE)
            result += weight * tap
    else:
        source_channel = _source_channel(op_b, image, channel, ok, channels, OP_B)
        result = _first_op(source, image, source_channel, y, x, ok, sizes, op_a, OP_A, AFFINE_A,
                           ACC_TYPE)
        result = _pointwise(result, op_b, image, channel, y, x, ok, sizes, OP_B, ACC_TYPE)
    tl.store(out_ptr + flat, result.to(out_ptr.dtype.element_ty), mask=ok)


def augment_block(op_a, op_b, numel):
    """Elements per program. Two affine ops keep 16 bilinear taps and their weights live per
    element; 256 elements over 4 warps (2 per thread) keep them in registers, where 1024
    would spill. One affine op or none: 1024."""
    affine = augment_ops.AFFINE_OPS
    largest = 256 if op_a in affine and op_b in affine else 1024
    return min(largest, triton.next_power_of_2(numel))


def _augment_pair(x, op_a, op_b, params, draw_a, draw_b, seed_a, seed_b, out_dtype):
    """op_b(op_a(x)) as a contiguous map of out_dtype; op_b may be NO_OP."""
    _, channels, height, width = x.shape
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    block = augment_block(op_a, op_b, out.numel())
    with on_device(x):
        wrap_triton(_feature_augment_kernel)[(triton.cdiv(out.numel(), block),)](
            x,
            out,
            params,
            draw_a,
            draw_b,
            seed_a,
            seed_b,
            out.numel(),
            channels,
            height,
            width,
            *x.stride(),
            OP_A=op_a,
            OP_B=op_b,
            AFFINE_A=op_a in augment_ops.AFFINE_OPS,
            AFFINE_B=op_b in augment_ops.AFFINE_OPS,
            ACC_TYPE=accumulator_type(x.dtype),
            BLOCK=block,
            num_warps=num_warps_for(block),
        )
    return out


def _op_parameters(op, value):
    """The kernel's parameter row of one op: v, then theta (zeros for non-affine ops)."""
    if op in augment_ops.AFFINE_OPS:
        theta = augment_ops.affine_matrix(op, value).reshape(6)
    else:
        theta = value.new_zeros(6)
    return torch.cat((value.reshape(1), theta))


def feature_augment(x, op_ids, values, draws, noise_seeds):
    """The sokd::feature_augment schema: op_ids applied in order to x, a contiguous map of
    x's dtype. draws[i] holds the tensor drawn for op i (None for the others) and
    noise_seeds[i] the seed of a noise op (read for noise ops only)."""
    acc_dtype = accumulation_dtype(x.dtype)
    values = values.to(device=x.device, dtype=torch.float32)
    out = x
    for start in range(0, len(op_ids), 2):
        pair = list(op_ids[start : start + 2])
        pair_draws = list(draws[start : start + 2])
        rows = [_op_parameters(op, value) for op, value in zip(pair, values[start : start + 2])]
        seeds = [
            seed if op == augment_ops.NOISE else 0 for op, seed in zip(pair, noise_seeds[start:])
        ]
        if len(pair) == 1:
            pair.append(NO_OP)
            pair_draws.append(None)
            rows.append(values.new_zeros(_PARAMS_PER_OP.value))
            seeds.append(0)
        last = start + 2 >= len(op_ids)
        out = _augment_pair(
            out,
            pair[0],
            pair[1],
            torch.stack(rows),
            pair_draws[0],
            pair_draws[1],
            seeds[0],
            seeds[1],
            x.dtype if last else acc_dtype,
        )
    return out
