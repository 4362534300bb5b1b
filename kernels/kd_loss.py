"""Fused temperature KD: T^2 * KL(softmax(t/T) || softmax(s/T)) per row and its gradient.

Rows are N x K logits or the positions of dense N x K x H x W maps (classes on dim 1); both are
seen as (images, classes, rows per image), so one kernel covers them with a (rows x classes)
tile whose contiguous side follows the memory layout. A row that fits one tile is read once and
its gradient T * w * (softmax(s/T) - softmax(t/T)) written from registers. Longer rows (K up to
128k) take two passes over their chunks: online softmax statistics, then the gradient.

Per-program partial sums are added by torch in a fixed order (deterministic). The normalising
scale 1 / (rows or the weight sum) is computed on the device before the launch and read by the
kernel, which writes the gradient already normalised, in the accumulation type. A weight summing
to 0 gives scale 0: loss and gradient 0.

The temperature travels as a float32 kernel argument; float64 inputs otherwise compute in
float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from sokd.reference.common import accumulation_dtype

from ._common import (
    accumulator_type,
    gradient_like,
    image_rows,
    launch_strides,
    num_warps_for,
    on_device,
    per_row,
    reciprocal_or_zero,
    row_alignment,
    row_tile,
)
from ._online_softmax import log_sum_exp, merge_chunk


@triton.jit
def _load_scaled(rows_ptr, classes_index, stride_k, valid, row_ok, temperature, ACC_TYPE):
    """A (rows x classes) tile divided by T, with -inf outside the row."""
    # 64-bit: the classes of a dense map lie H*W apart, and K*H*W may pass 2^31.
    values = tl.load(
        rows_ptr + classes_index.to(tl.int64)[None, :] * stride_k,
        mask=row_ok[:, None] & valid,
        other=0,
    )
    return tl.where(valid, values.to(ACC_TYPE) / temperature, float("-inf"))


@triton.jit
def _kd_kernel(
    student_ptr,
    teacher_ptr,
    weight_ptr,
    scale_ptr,
    grad_ptr,
    partial_ptr,
    classes,
    rows,
    row_blocks,
    student_stride_n,
    student_stride_k,
    student_stride_r,
    teacher_stride_n,
    teacher_stride_k,
    teacher_stride_r,
    weight_stride_n,
    weight_stride_r,
    grad_stride_n,
    grad_stride_k,
    grad_stride_r,
    temperature,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ACC_TYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    if ROW_ALIGN > 1:
        # Row starts and the row length are multiples of ROW_ALIGN (see row_alignment). Said
        # as arithmetic that the compiler's alignment analysis follows (exact for such
        # values), the loads along a row become 16 bytes wide with uniform masks whatever K is.
        classes = classes // ROW_ALIGN * ROW_ALIGN
        student_stride_r = student_stride_r // ROW_ALIGN * ROW_ALIGN
        teacher_stride_r = teacher_stride_r // ROW_ALIGN * ROW_ALIGN
        grad_stride_r = grad_stride_r // ROW_ALIGN * ROW_ALIGN
    block = tl.program_id(0)
    image = (block // row_blocks).to(tl.int64)
    row = (block % row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    chunk = tl.arange(0, BLOCK_K)
    # 64-bit row offsets: N x K logits with a large vocabulary pass 2^31 elements.
    row64 = row.to(tl.int64)
    row_offset = row64[:, None]
    student_rows = student_ptr + image * student_stride_n + row_offset * student_stride_r
    teacher_rows = teacher_ptr + image * teacher_stride_n + row_offset * teacher_stride_r

    max_s = tl.full((BLOCK_R,), float("-inf"), ACC_TYPE)
    max_t = tl.full((BLOCK_R,), float("-inf"), ACC_TYPE)
    sum_s = tl.zeros((BLOCK_R,), ACC_TYPE)
    sum_t = tl.zeros((BLOCK_R,), ACC_TYPE)
    # sum over classes of exp(t - max_t) * (t - s): the teacher-weighted log-ratio.
    cross = tl.zeros((BLOCK_R,), ACC_TYPE)
    if SINGLE_CHUNK:
        valid = (chunk < classes)[None, :]
        a = _load_scaled(
            student_rows, chunk, student_stride_k, valid, row_ok, temperature, ACC_TYPE
        )
        b = _load_scaled(
            teacher_rows, chunk, teacher_stride_k, valid, row_ok, temperature, ACC_TYPE
        )
        max_s, sum_s, _, _ = merge_chunk(max_s, sum_s, a)
        max_t, sum_t, _, shift_t = merge_chunk(max_t, sum_t, b)
        cross = tl.sum(tl.where(valid, tl.exp(b - shift_t[:, None]) * (b - a), 0.0), axis=1)
    else:
        for start in range(0, classes, BLOCK_K):
            index = start + chunk
            valid = (index < classes)[None, :]
            a = _load_scaled(
                student_rows, index, student_stride_k, valid, row_ok, temperature, ACC_TYPE
            )
            b = _load_scaled(
                teacher_rows, index, teacher_stride_k, valid, row_ok, temperature, ACC_TYPE
            )
            max_s, sum_s, _, _ = merge_chunk(max_s, sum_s, a)
            max_t, sum_t, rescale_t, shift_t = merge_chunk(max_t, sum_t, b)
            cross = cross * rescale_t + tl.sum(
                tl.where(valid, tl.exp(b - shift_t[:, None]) * (b - a), 0.0), axis=1
            )
    lse_s = log_sum_exp(max_s, sum_s)
    lse_t = log_sum_exp(max_t, sum_t)
    kl = cross / sum_t + lse_s - lse_t

    if HAS_WEIGHT:
        weight = tl.load(
            weight_ptr + image * weight_stride_n + row64 * weight_stride_r,
            mask=row_ok,
            other=0,
        ).to(ACC_TYPE)
    else:
        weight = tl.where(row_ok, 1.0, 0.0).to(ACC_TYPE)
    row_loss = tl.where(row_ok, kl * weight, 0.0) * (temperature * temperature)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(row_loss, axis=0))

    if COMPUTE_GRAD:
        factor = (weight * (temperature * tl.load(scale_ptr).to(ACC_TYPE)))[:, None]
        grad_rows = grad_ptr + image * grad_stride_n + row_offset * grad_stride_r
        if SINGLE_CHUNK:
            grad = (tl.exp(a - lse_s[:, None]) - tl.exp(b - lse_t[:, None])) * factor
            tl.store(
                grad_rows + chunk.to(tl.int64)[None, :] * grad_stride_k,
                grad.to(grad_ptr.dtype.element_ty),
                mask=row_ok[:, None] & valid,
            )
        else:
            for start in range(0, classes, BLOCK_K):
                index = start + chunk
                valid = (index < classes)[None, :]
                a = _load_scaled(
                    student_rows, index, student_stride_k, valid, row_ok, temperature, ACC_TYPE
                )
                b = _load_scaled(
                    teacher_rows, index, teacher_stride_k, valid, row_ok, temperature, ACC_TYPE
                )
                grad = (tl.exp(a - lse_s[:, None]) - tl.exp(b - lse_t[:, None])) * factor
                tl.store(
                    grad_rows + index.to(tl.int64)[None, :] * grad_stride_k,
                    grad.to(grad_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & valid,
                )


def kd_loss(student_logits, teacher_logits, temperature, weight, with_grad):
    """The sokd::kd_loss schema: (loss, d loss / d student_logits), the gradient normalised,
    contiguous and in the accumulation dtype, or empty when with_grad is false."""
    student_rows = image_rows(student_logits)
    teacher_rows = image_rows(teacher_logits)
    images, classes, rows = student_rows.shape
    weight_rows = per_row(weight, student_logits.dim()) if weight is not None else None
    grad = gradient_like(student_logits, with_grad)
    grad_rows = image_rows(grad) if with_grad else grad

    block_r, block_k = row_tile(classes, rows)
    row_blocks = triton.cdiv(rows, block_r)
    programs = images * row_blocks
    acc_dtype = accumulation_dtype(student_logits.dtype)
    if weight is not None:
        scale = reciprocal_or_zero(weight.sum(dtype=acc_dtype))
    else:
        scale = torch.full(
            (), 1.0 / (images * rows), dtype=acc_dtype, device=student_logits.device
        )
    partials = student_logits.new_empty(programs, dtype=acc_dtype)
    with on_device(student_logits):
        wrap_triton(_kd_kernel)[(programs,)](
            student_rows,
            teacher_rows,
            weight_rows,
            scale,
            grad_rows,
            partials,
            classes,
            rows,
            row_blocks,
            *launch_strides(student_rows),
            *launch_strides(teacher_rows),
            *(launch_strides(weight_rows) if weight is not None else (0, 0)),
            *(launch_strides(grad_rows) if with_grad else (0, 0, 0)),
            temperature,
            HAS_WEIGHT=weight is not None,
            COMPUTE_GRAD=with_grad,
            ACC_TYPE=accumulator_type(student_logits.dtype),
            BLOCK_R=block_r,
            BLOCK_K=block_k,
            SINGLE_CHUNK=classes <= block_k,
            ROW_ALIGN=row_alignment(classes, student_rows, teacher_rows, grad_rows),
            num_warps=num_warps_for(block_r * block_k),
        )
    return partials.sum() * scale, grad
