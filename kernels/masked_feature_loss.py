"""Fused masked feature loss: sum(mask^2 * (s - t)^2) / Z and its gradient in one read.

Each program owns a block of spatial positions of one image and a group of channels. It reads
the mask block once, walks its channels, writes the gradient 2 * mask^2 * (s - t) / Z and one
partial sum. The partials are added by torch in a fixed order, so the loss is deterministic.
1 / Z comes from the mask (C * sum(mask^2)) or the size before the launch, on the device, so
the kernel writes the gradient already normalised, in the accumulation type: 2 m^2 / Z is formed
in the accumulation type first, as 2 m^2 (s - t) alone would overflow float16 long before the
gradient does. An all-zero mask under normalize_by_mask gives 1 / Z = 0: loss and gradient 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from sokd.reference.common import accumulation_dtype

from ._common import (
    TARGET_PROGRAMS,
    accumulator_type,
    gradient_like,
    num_warps_for,
    on_device,
    reciprocal_or_zero,
)


@triton.jit
def _masked_feature_loss_kernel(
    student_ptr,
    teacher_ptr,
    mask_ptr,
    scale_ptr,
    grad_ptr,
    partial_ptr,
    channels,
    positions,
    position_blocks,
    channels_per_group,
    student_stride_n,
    student_stride_c,
    student_stride_p,
    teacher_stride_n,
    teacher_stride_c,
    teacher_stride_p,
    mask_stride_n,
    mask_stride_p,
    grad_stride_n,
    grad_stride_c,
    grad_stride_p,
    HAS_MASK: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ACC_TYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    block = tl.program_id(0)
    group = tl.program_id(1)
    image = (block // position_blocks).to(tl.int64)
    position = (block % position_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_map = position < positions

    # 64-bit address math: C * H * W of one image may pass 2^31, and so may a position times
    # its stride in a channels-last map.
    position64 = position.to(tl.int64)
    if HAS_MASK:
        weight = tl.load(
            mask_ptr + image * mask_stride_n + position64 * mask_stride_p, mask=in_map, other=0
        ).to(ACC_TYPE)
        weight_sq = weight * weight
    else:
        weight_sq = tl.where(in_map, 1.0, 0.0).to(ACC_TYPE)

    # The address math that does not change along the channels, hoisted out of the loop.
    student_at = student_ptr + image * student_stride_n + position64[None, :] * student_stride_p
    teacher_at = teacher_ptr + image * teacher_stride_n + position64[None, :] * teacher_stride_p
    grad_at = grad_ptr + image * grad_stride_n + position64[None, :] * grad_stride_p
    if COMPUTE_GRAD:
        grad_weight = (2 * tl.load(scale_ptr).to(ACC_TYPE)) * weight_sq[None, :]

    total = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC_TYPE)
    first_channel = group * channels_per_group
    for start in range(0, channels_per_group, BLOCK_C):
        channel = first_channel + start + tl.arange(0, BLOCK_C)
        inside = (channel < channels)[:, None] & in_map[None, :]
        channel64 = channel.to(tl.int64)[:, None]
        student = tl.load(
            student_at + channel64 * student_stride_c, mask=inside, other=0
        ).to(ACC_TYPE)
        teacher = tl.load(
            teacher_at + channel64 * teacher_stride_c, mask=inside, other=0
        ).to(ACC_TYPE)
        difference = student - teacher
        total += weight_sq[None, :] * difference * difference
        if COMPUTE_GRAD:
            tl.store(
                grad_at + channel64 * grad_stride_c,
                (grad_weight * difference).to(grad_ptr.dtype.element_ty),
                mask=inside,
            )

    program = block * tl.num_programs(1) + group
    tl.store(partial_ptr + program, tl.sum(tl.sum(total, axis=1), axis=0))


def _launch_shape(images, channels, positions):
    """(BLOCK_C, BLOCK_P, channel groups, channels per group) for an images x C x HW map."""
    block_p = min(triton.next_power_of_2(positions), 1024)
    block_c = min(triton.next_power_of_2(channels), max(1, 2048 // block_p))
    channel_blocks = triton.cdiv(channels, block_c)
    spatial_programs = images * triton.cdiv(positions, block_p)
    groups = min(channel_blocks, max(1, TARGET_PROGRAMS // spatial_programs))
    channels_per_group = block_c * triton.cdiv(channel_blocks, groups)
    groups = triton.cdiv(channels, channels_per_group)
    return block_c, block_p, groups, channels_per_group


def masked_feature_loss(student, teacher, mask, normalize_by_mask, with_grad):
    """The sokd::masked_feature_loss schema: (loss, d loss / d student), the gradient
    normalised, contiguous and in the accumulation dtype, or empty when with_grad is false."""
    images, channels = student.shape[:2]
    student_3d = student.reshape(images, channels, -1)
    teacher_3d = teacher.reshape(images, channels, -1)
    positions = student_3d.shape[2]
    mask_2d = mask.reshape(images, positions) if mask is not None else None
    grad = gradient_like(student, with_grad)
    grad_3d = grad.view(images, channels, positions) if with_grad else grad
    grad_strides = grad_3d.stride() if with_grad else (0, 0, 0)
    mask_strides = mask_2d.stride() if mask is not None else (0, 0)

    block_c, block_p, groups, channels_per_group = _launch_shape(images, channels, positions)
    position_blocks = triton.cdiv(positions, block_p)
    programs = images * position_blocks * groups
    acc_dtype = accumulation_dtype(student.dtype)
    if mask is not None and normalize_by_mask:
        scale = reciprocal_or_zero(channels * mask.to(acc_dtype).square().sum())
    else:
        scale = torch.full((), 1.0 / student.numel(), dtype=acc_dtype, device=student.device)
    partials = student.new_empty(programs, dtype=acc_dtype)
    with on_device(student):
        wrap_triton(_masked_feature_loss_kernel)[(images * position_blocks, groups)](
            student_3d,
            teacher_3d,
            mask_2d,
            scale,
            grad_3d,
            partials,
            channels,
            positions,
            position_blocks,
            channels_per_group,
            *student_3d.stride(),
            *teacher_3d.stride(),
            *mask_strides,
            *grad_strides,
            HAS_MASK=mask is not None,
            COMPUTE_GRAD=with_grad,
            ACC_TYPE=accumulator_type(student.dtype),
            BLOCK_C=block_c,
            BLOCK_P=block_p,
            num_warps=num_warps_for(block_c * block_p),
        )
    return partials.sum() * scale, grad
