"""Fused decoupled KD over a class set G (DKD and masked logit KD) and its gradient.

For each row and each network the kernel keeps online softmax statistics of the classes in G
and of those outside it, each against its own running maximum (a shared one could underflow a
whole group). From them, with a = s/T and b = t/T:

    TCKD = sum over the two groups j of P_t(j) * (log P_t(j) - log P_s(j))
    NCKD = KL between the softmaxes of a and b restricted to the complement of G
    d row / d s_c = T * (alpha * (p_s(c) - P_t(j) * q_s(c)) + beta * [c not in G] * (q_s(c) - q_t(c)))

where j is the group of class c and q is the softmax within that group. A group that holds no
class of the row contributes nothing; whether it holds one comes from the class mask, never
from the sums, so a row of -inf logits gives NaN as the reference does. Rows, tiles, chunking,
partial sums and the normalised gradient work as in kd_loss.py; the temperature and the
weights travel as float32 kernel arguments.
"""

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
    on_device,
    row_alignment,
    row_tile,
)
from ._online_softmax import log_sum_exp, merge_chunk


# A tile of decoupled KD keeps about twice the live values per element of plain KD (two
# networks' values, both class-set flags and four groups of statistics). ptxas reports spills
# for 128 x 32 dense tiles at 16 elements per thread; at most 2048 elements and 8 per thread
# keep every tile in registers (tests/triton_compile.py reports both).
_MAX_TILE = 2048


def _num_warps(tile_elements):
    return max(4, min(16, tile_elements // 256))


@triton.jit
def _load_chunk(
    student_rows,
    teacher_rows,
    mask_rows,
    index,
    classes,
    student_stride_k,
    teacher_stride_k,
    mask_stride_k,
    row_ok,
    temperature,
    ACC_TYPE,
):
    """Student and teacher tiles divided by T (-inf past the row) and the class-set flags."""
    valid = (index < classes)[None, :]
    inside = row_ok[:, None] & valid
    # 64-bit: the classes of a dense map lie H*W apart, and K*H*W may pass 2^31.
    offset = index.to(tl.int64)[None, :]
    student = tl.load(student_rows + offset * student_stride_k, mask=inside, other=0)
    teacher = tl.load(teacher_rows + offset * teacher_stride_k, mask=inside, other=0)
    in_set = tl.load(mask_rows + offset * mask_stride_k, mask=inside, other=0) != 0
    a = tl.where(valid, student.to(ACC_TYPE) / temperature, float("-inf"))
    b = tl.where(valid, teacher.to(ACC_TYPE) / temperature, float("-inf"))
    return a, b, in_set, valid & ~in_set


@triton.jit
def _fold_chunk(
    max_s_in,
    sum_s_in,
    max_s_out,
    sum_s_out,
    max_t_in,
    sum_t_in,
    max_t_out,
    sum_t_out,
    cross_out,
    count_in,
    count_out,
    a,
    b,
    in_set,
    out_set,
):
    """Fold one chunk into the per-group statistics of both networks, into the NCKD sum
    of exp(b - max_t_out) * (b - a) over the classes outside G, and into the class counts of
    G and of its complement."""
    max_s_in, sum_s_in, _, _ = merge_chunk(max_s_in, sum_s_in, tl.where(in_set, a, float("-inf")))
    max_s_out, sum_s_out, _, _ = merge_chunk(
        max_s_out, sum_s_out, tl.where(out_set, a, float("-inf"))
    )
    max_t_in, sum_t_in, _, _ = merge_chunk(max_t_in, sum_t_in, tl.where(in_set, b, float("-inf")))
    max_t_out, sum_t_out, rescale, shift = merge_chunk(
        max_t_out, sum_t_out, tl.where(out_set, b, float("-inf"))
    )
    cross_out = cross_out * rescale + tl.sum(
        tl.where(out_set, tl.exp(b - shift[:, None]) * (b - a), 0.0), axis=1
    )
    count_in += tl.sum(in_set.to(tl.int32), axis=1)
    count_out += tl.sum(out_set.to(tl.int32), axis=1)
    return (
        max_s_in,
        sum_s_in,
        max_s_out,
        sum_s_out,
        max_t_in,
        sum_t_in,
        max_t_out,
        sum_t_out,
        cross_out,
        count_in,
        count_out,
    )


@triton.jit
def _log_add_exp(x, y):
    top = tl.maximum(x, y)
    shift = tl.where(top == float("-inf"), 0.0, top)
    return shift + tl.log(tl.exp(x - shift) + tl.exp(y - shift))


@triton.jit
def _gradient(
    a,
    b,
    in_set,
    out_set,
    lse_s,
    lse_s_in,
    lse_s_out,
    lse_t_out,
    p_t_in,
    p_t_out,
    alpha,
    beta,
    scale,
):
    """grad_coef * d(row loss)/d s of a tile, where scale = T / rows."""
    group_lse = tl.where(in_set, lse_s_in[:, None], lse_s_out[:, None])
    group_p_t = tl.where(in_set, p_t_in[:, None], p_t_out[:, None])
    p_s = tl.exp(a - lse_s[:, None])
    q_s = tl.exp(a - group_lse)
    q_t = tl.exp(b - lse_t_out[:, None])
    tckd = p_s - group_p_t * q_s
    nckd = tl.where(out_set, q_s - q_t, 0.0)
    return (alpha * tckd + beta * nckd) * scale


@triton.jit
def _decoupled_kd_kernel(
    student_ptr,
    teacher_ptr,
    mask_ptr,
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
    mask_stride_n,
    mask_stride_k,
    mask_stride_r,
    grad_stride_n,
    grad_stride_k,
    grad_stride_r,
    temperature,
    alpha,
    beta,
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
        mask_stride_r = mask_stride_r // ROW_ALIGN * ROW_ALIGN
        grad_stride_r = grad_stride_r // ROW_ALIGN * ROW_ALIGN
    block = tl.program_id(0)
    image = (block // row_blocks).to(tl.int64)
    row = (block % row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    chunk = tl.arange(0, BLOCK_K)
    # 64-bit row offsets: N x K logits with a large vocabulary pass 2^31 elements.
    row_offset = row.to(tl.int64)[:, None]
    student_rows = student_ptr + image * student_stride_n + row_offset * student_stride_r
    teacher_rows = teacher_ptr + image * teacher_stride_n + row_offset * teacher_stride_r
    mask_rows = mask_ptr + image * mask_stride_n + row_offset * mask_stride_r

    max_s_in = tl.full((BLOCK_R,), float("-inf"), ACC_TYPE)
    max_s_out = tl.full((BLOCK_R,), float("-inf"), ACC_TYPE)
    max_t_in = tl.full((BLOCK_R,), float("-inf"), ACC_TYPE)
    max_t_out = tl.full((BLOCK_R,), float("-inf"), ACC_TYPE)
    sum_s_in = tl.zeros((BLOCK_R,), ACC_TYPE)
    sum_s_out = tl.zeros((BLOCK_R,), ACC_TYPE)
    sum_t_in = tl.zeros((BLOCK_R,), ACC_TYPE)
    sum_t_out = tl.zeros((BLOCK_R,), ACC_TYPE)
    cross_out = tl.zeros((BLOCK_R,), ACC_TYPE)
    count_in = tl.zeros((BLOCK_R,), tl.int32)
    count_out = tl.zeros((BLOCK_R,), tl.int32)
    if SINGLE_CHUNK:
        a, b, in_set, out_set = _load_chunk(
            student_rows,
            teacher_rows,
            mask_rows,
            chunk,
            classes,
            student_stride_k,
            teacher_stride_k,
            mask_stride_k,
            row_ok,
            temperature,
            ACC_TYPE,
        )
        (
            max_s_in,
            sum_s_in,
            max_s_out,
            sum_s_out,
            max_t_in,
            sum_t_in,
            max_t_out,
            sum_t_out,
            cross_out,
            count_in,
            count_out,
        ) = _fold_chunk(
            max_s_in,
            sum_s_in,
            max_s_out,
            sum_s_out,
            max_t_in,
            sum_t_in,
            max_t_out,
            sum_t_out,
            cross_out,
            count_in,
            count_out,
            a,
            b,
            in_set,
            out_set,
        )
    else:
        for start in range(0, classes, BLOCK_K):
            a, b, in_set, out_set = _load_chunk(
                student_rows,
                teacher_rows,
                mask_rows,
                start + chunk,
                classes,
                student_stride_k,
                teacher_stride_k,
                mask_stride_k,
                row_ok,
                temperature,
                ACC_TYPE,
            )
            (
                max_s_in,
                sum_s_in,
                max_s_out,
                sum_s_out,
                max_t_in,
                sum_t_in,
                max_t_out,
                sum_t_out,
                cross_out,
                count_in,
                count_out,
            ) = _fold_chunk(
                max_s_in,
                sum_s_in,
                max_s_out,
                sum_s_out,
                max_t_in,
                sum_t_in,
                max_t_out,
                sum_t_out,
                cross_out,
                count_in,
                count_out,
                a,
                b,
                in_set,
                out_set,
            )

    lse_s_in = log_sum_exp(max_s_in, sum_s_in)
    lse_s_out = log_sum_exp(max_s_out, sum_s_out)
    lse_t_in = log_sum_exp(max_t_in, sum_t_in)
    lse_t_out = log_sum_exp(max_t_out, sum_t_out)
    lse_s = _log_add_exp(lse_s_in, lse_s_out)
    lse_t = _log_add_exp(lse_t_in, lse_t_out)
    # Presence comes from the class mask: a group of -inf logits sums to 0 yet is present, and
    # its NaN terms must propagate as they do in the reference.
    has_in = count_in != 0
    has_out = count_out != 0
    log_p_t_in = lse_t_in - lse_t
    log_p_t_out = lse_t_out - lse_t
    p_t_in = tl.exp(log_p_t_in)
    p_t_out = tl.exp(log_p_t_out)
    tckd = tl.where(has_in, p_t_in * (log_p_t_in - (lse_s_in - lse_s)), 0.0) + tl.where(
        has_out, p_t_out * (log_p_t_out - (lse_s_out - lse_s)), 0.0
    )
    safe_sum_t_out = tl.where(has_out, sum_t_out, 1.0)
    nckd = tl.where(has_out, cross_out / safe_sum_t_out + lse_s_out - lse_t_out, 0.0)
    row_loss = tl.where(row_ok, alpha * tckd + beta * nckd, 0.0) * (temperature * temperature)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(row_loss, axis=0))

    if COMPUTE_GRAD:
        grad_rows = grad_ptr + image * grad_stride_n + row_offset * grad_stride_r
        grad_scale = temperature * tl.load(scale_ptr).to(ACC_TYPE)
        if SINGLE_CHUNK:
            grad = _gradient(
                a,
                b,
                in_set,
                out_set,
                lse_s,
                lse_s_in,
                lse_s_out,
                lse_t_out,
                p_t_in,
                p_t_out,
                alpha,
                beta,
                grad_scale,
            )
            tl.store(
                grad_rows + chunk.to(tl.int64)[None, :] * grad_stride_k,
                grad.to(grad_ptr.dtype.element_ty),
                mask=row_ok[:, None] & (chunk < classes)[None, :],
            )
        else:
            for start in range(0, classes, BLOCK_K):
                index = start + chunk
                a, b, in_set, out_set = _load_chunk(
                    student_rows,
                    teacher_rows,
                    mask_rows,
                    index,
                    classes,
                    student_stride_k,
                    teacher_stride_k,
                    mask_stride_k,
                    row_ok,
                    temperature,
                    ACC_TYPE,
                )
                grad = _gradient(
                    a,
                    b,
                    in_set,
                    out_set,
                    lse_s,
                    lse_s_in,
                    lse_s_out,
                    lse_t_out,
                    p_t_in,
                    p_t_out,
                    alpha,
                    beta,
                    grad_scale,
                )
                tl.store(
                    grad_rows + index.to(tl.int64)[None, :] * grad_stride_k,
                    grad.to(grad_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & (index < classes)[None, :],
                )


def decoupled_kd_loss(
    student_logits, teacher_logits, class_mask, alpha, beta, temperature, with_grad
):
    """The sokd::decoupled_kd_loss schema: (loss, d loss / d student_logits), the gradient
    normalised, contiguous and in the accumulation dtype, or empty when with_grad is false."""
    student_rows = image_rows(student_logits)
    teacher_rows = image_rows(teacher_logits)
    mask_rows = image_rows(class_mask)
    images, classes, rows = student_rows.shape
    grad = gradient_like(student_logits, with_grad)
    grad_rows = image_rows(grad) if with_grad else grad

    block_r, block_k = row_tile(classes, rows, _MAX_TILE)
    row_blocks = triton.cdiv(rows, block_r)
    programs = images * row_blocks
    acc_dtype = accumulation_dtype(student_logits.dtype)
    partials = student_logits.new_empty(programs, dtype=acc_dtype)
    scale = torch.full((), 1.0 / (images * rows), dtype=acc_dtype, device=student_logits.device)
    with on_device(student_logits):
        wrap_triton(_decoupled_kd_kernel)[(programs,)](
            student_rows,
            teacher_rows,
            mask_rows,
            scale,
            grad_rows,
            partials,
            classes,
            rows,
            row_blocks,
            *launch_strides(student_rows),
            *launch_strides(teacher_rows),
            *launch_strides(mask_rows),
            *(launch_strides(grad_rows) if with_grad else (0, 0, 0)),
            temperature,
            alpha,
            beta,
            COMPUTE_GRAD=with_grad,
            ACC_TYPE=accumulator_type(student_logits.dtype),
            BLOCK_R=block_r,
            BLOCK_K=block_k,
            SINGLE_CHUNK=classes <= block_k,
            ROW_ALIGN=row_alignment(classes, student_rows, teacher_rows, mask_rows, grad_rows),
            num_warps=_num_warps(block_r * block_k),
        )
    return partials.sum() * scale, grad
