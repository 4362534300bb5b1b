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

import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import launch_strides, num_warps_for, on_device, per_row, reciprocal_or_zero
from ._online_softmax import log_sum_exp, merge_chunk
from ._row_tiles import RowLaunch, load_logits, multiple_of, program_rows, row_starts, store_tile


@triton.jit
def _fold_chunk(statistics, a, b, valid):
    """Fold a tile into (max_s, sum_s, max_t, sum_t, cross): the online softmax statistics of
    both networks and cross, the sum over classes of exp(t - max_t) * (t - s), the
    teacher-weighted log-ratio, rescaled as max_t moves."""
    max_s, sum_s, max_t, sum_t, cross = statistics
    max_s, sum_s, _, _ = merge_chunk(max_s, sum_s, a)
    max_t, sum_t, rescale_t, shift_t = merge_chunk(max_t, sum_t, b)
    cross = cross * rescale_t + tl.sum(
        tl.where(valid, tl.exp(b - shift_t[:, None]) * (b - a), 0.0), axis=1
    )
    return max_s, sum_s, max_t, sum_t, cross


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
    classes = multiple_of(classes, ROW_ALIGN)
    image, row64, row_ok = program_rows(row_blocks, rows, BLOCK_R)
    chunk = tl.arange(0, BLOCK_K)
    logits = (
        row_starts(student_ptr, image, row64, student_stride_n, student_stride_r, ROW_ALIGN),
        row_starts(teacher_ptr, image, row64, teacher_stride_n, teacher_stride_r, ROW_ALIGN),
    )
    strides_k = (student_stride_k, teacher_stride_k)

    no_max = tl.full((BLOCK_R,), float("-inf"), ACC_TYPE)
    no_sum = tl.zeros((BLOCK_R,), ACC_TYPE)
    statistics = (no_max, no_sum, no_max, no_sum, no_sum)
    if SINGLE_CHUNK:
        a, b, valid = load_logits(logits, strides_k, chunk, classes, row_ok, temperature, ACC_TYPE)
        statistics = _fold_chunk(statistics, a, b, valid)
    else:
        for start in range(0, classes, BLOCK_K):
            a, b, valid = load_logits(
                logits, strides_k, start + chunk, classes, row_ok, temperature, ACC_TYPE
            )
            statistics = _fold_chunk(statistics, a, b, valid)
    max_s, sum_s, max_t, sum_t, cross = statistics
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
        grad_rows = row_starts(grad_ptr, image, row64, grad_stride_n, grad_stride_r, ROW_ALIGN)
        if SINGLE_CHUNK:
            grad = (tl.exp(a - lse_s[:, None]) - tl.exp(b - lse_t[:, None])) * factor
            store_tile(grad_rows, chunk, grad_stride_k, grad, valid, row_ok)
        else:
            for start in range(0, classes, BLOCK_K):
                index = start + chunk
                a, b, valid = load_logits(
                    logits, strides_k, index, classes, row_ok, temperature, ACC_TYPE
                )
                grad = (tl.exp(a - lse_s[:, None]) - tl.exp(b - lse_t[:, None])) * factor
                store_tile(grad_rows, index, grad_stride_k, grad, valid, row_ok)


def kd_loss(student_logits, teacher_logits, temperature, weight, with_grad):
    """The sokd::kd_loss schema: (loss, d loss / d student_logits), the gradient normalised,
    contiguous and in the accumulation dtype, or empty when with_grad is false."""
    launch = RowLaunch.plan(student_logits, teacher_logits, with_grad)
    if weight is not None:
        weight_rows = per_row(weight, student_logits.dim())
        weight_strides = launch_strides(weight_rows)
        scale = reciprocal_or_zero(weight.sum(dtype=launch.partials.dtype))
    else:
        weight_rows, weight_strides, scale = None, (0, 0), launch.mean_scale()
    with on_device(student_logits):
        wrap_triton(_kd_kernel)[launch.grid](
            *launch.arguments(weight_rows, weight_strides, scale),
            temperature,
            HAS_WEIGHT=weight is not None,
            **launch.options(num_warps_for),
        )
    return launch.result(scale)
