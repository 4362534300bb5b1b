"""Fused masked feature loss: sum(mask^2 * (s - t)^2) / Z and its gradient in one read.

Each program owns a block of spatial positions of one image and a group of channels. It reads
the mask block once, walks its channels, writes the gradient 2 * mask^2 * (s - t) and one
partial sum. The partials are added by torch in a fixed order, so the loss is deterministic.
The gradient is saved unscaled; backward multiplies it by grad_output / Z, the one pass over
it that autograd needs anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import (
    TARGET_PROGRAMS,
    accumulator_type,
    differentiable_once,
    loss_dtype,
    num_warps_for,
    unscaled_gradient_like,
)


@triton.jit
def _masked_feature_loss_kernel(
    student_ptr,
    teacher_ptr,
    mask_ptr,
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

    if HAS_MASK:
        weight = tl.load(
            mask_ptr + image * mask_stride_n + position * mask_stride_p, mask=in_map, other=0
        ).to(ACC_TYPE)
        weight_sq = weight * weight
    else:
        weight_sq = tl.where(in_map, 1.0, 0.0).to(ACC_TYPE)

    total = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC_TYPE)
    first_channel = group * channels_per_group
    for start in range(0, channels_per_group, BLOCK_C):
        channel = first_channel + start + tl.arange(0, BLOCK_C)
        inside = (channel < channels)[:, None] & in_map[None, :]
        student = tl.load(
            student_ptr
            + image * student_stride_n
            + channel[:, None] * student_stride_c
            + position[None, :] * student_stride_p,
            mask=inside,
            other=0,
        ).to(ACC_TYPE)
        teacher = tl.load(
            teacher_ptr
            + image * teacher_stride_n
            + channel[:, None] * teacher_stride_c
            + position[None, :] * teacher_stride_p,
            mask=inside,
            other=0,
        ).to(ACC_TYPE)
        difference = student - teacher
        weighted = weight_sq[None, :] * difference
        total += weighted * difference
        if COMPUTE_GRAD:
            tl.store(
                grad_ptr
                + image * grad_stride_n
                + channel[:, None] * grad_stride_c
                + position[None, :] * grad_stride_p,
                (2 * weighted).to(grad_ptr.dtype.element_ty),
                mask=inside,
            )

    program = block * tl.num_programs(1) + group
    tl.store(partial_ptr + program, tl.sum(tl.sum(total, axis=1), axis=0))
    if HAS_MASK:
        # Only the first channel group counts the mask, so that sum(mask^2) is counted once.
        mask_total = tl.sum(weight_sq, axis=0)
        programs = tl.num_programs(0) * tl.num_programs(1)
        tl.store(partial_ptr + programs + program, tl.where(group == 0, mask_total, 0.0))


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


@triton_op("sokd_triton::masked_feature_loss", mutates_args=())
def _masked_feature_loss_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    normalize: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, unscaled gradient for the student, 1 / Z) for the masked feature loss."""
    images, channels = student.shape[:2]
    student_3d = student.reshape(images, channels, -1)
    teacher_3d = teacher.reshape(images, channels, -1)
    positions = student_3d.shape[2]
    mask_2d = mask.reshape(images, positions) if mask is not None else None
    grad_3d = unscaled_gradient_like(student_3d, compute_grad)
    grad_strides = grad_3d.stride() if compute_grad else (0, 0, 0)
    mask_strides = mask_2d.stride() if mask is not None else (0, 0)

    block_c, block_p, groups, channels_per_group = _launch_shape(images, channels, positions)
    position_blocks = triton.cdiv(positions, block_p)
    programs = images * position_blocks * groups
    acc_dtype = loss_dtype(student.dtype)
    partials = student.new_empty(2 * programs if mask is not None else programs, dtype=acc_dtype)
    wrap_triton(_masked_feature_loss_kernel)[(images * position_blocks, groups)](
        student_3d,
        teacher_3d,
        mask_2d,
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
        COMPUTE_GRAD=compute_grad,
        ACC_TYPE=accumulator_type(student.dtype),
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        num_warps=num_warps_for(block_c * block_p),
    )
    squared_total = partials[:programs].sum()
    if mask is not None and normalize == "mask":
        normaliser = channels * partials[programs:].sum()
        safe = torch.where(normaliser != 0, normaliser, 1)
        scale = torch.where(normaliser != 0, 1 / safe, 0)
    else:
        scale = torch.full((), 1.0 / student.numel(), dtype=acc_dtype, device=student.device)
    grad = grad_3d.view(student.shape) if compute_grad else grad_3d
    return squared_total * scale, grad, scale


@_masked_feature_loss_op.register_fake
def _(student, teacher, mask, normalize, compute_grad):
    # An explicit fake lets Dynamo propagate shapes without tracing the kernel launch, which
    # is also what keeps torch.compile working under the Triton interpreter.
    acc_dtype = loss_dtype(student.dtype)
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    return student.new_empty((), dtype=acc_dtype), grad, student.new_empty((), dtype=acc_dtype)


def _setup_context(ctx, inputs, output):
    _, unscaled_grad, scale = output
    ctx.mark_non_differentiable(unscaled_grad, scale)
    ctx.save_for_backward(unscaled_grad, scale)


@differentiable_once("sokd_triton::masked_feature_loss")
def _backward(ctx, grad_loss, _grad_unscaled, _grad_scale):
    unscaled_grad, scale = ctx.saved_tensors
    step = grad_loss * scale
    grad_student = unscaled_grad * step if ctx.needs_input_grad[0] else None
    grad_teacher = unscaled_grad * -step if ctx.needs_input_grad[1] else None
    return grad_student, grad_teacher, None, None, None


_masked_feature_loss_op.register_autograd(_backward, setup_context=_setup_context)


def masked_feature_loss(student, teacher, mask, normalize):
    """Backend entry point (see sokd/_backend.py): the loss, differentiable in both inputs."""
    compute_grad = torch.is_grad_enabled() and (student.requires_grad or teacher.requires_grad)
    loss, _, _ = _masked_feature_loss_op(student, teacher, mask, normalize, compute_grad)
    return loss
