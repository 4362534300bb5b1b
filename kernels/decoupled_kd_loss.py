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

import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import image_rows, launch_strides, on_device
from ._online_softmax import log_sum_exp, merge_chunk
from ._row_tiles import RowLaunch, load_logits, multiple_of, program_rows, row_starts, store_tile


# A tile of decoupled KD keeps about twice the live values per element of plain KD (two
# networks' values, both class-set flags and four groups of statistics). ptxas reports spills
# for 128 x 32 dense tiles at 16 elements per thread; at most 2048 elements and 8 per thread
# keep every tile in registers (tests/triton_compile.py reports both).
_MAX_TILE = 2048


def _num_warps(tile_elements):
    return max(4, min(16, tile_elements // 256))


@triton.jit
def _load_chunk(inputs, strides_k, index, classes, row_ok, temperature, ACC_TYPE):
    """Student and teacher tiles divided by T (-inf past the row) and the flags of the classes
    in G and in its complement; `inputs` and `strides_k` are (student, teacher, class mask)."""
    a, b, valid = load_logits(inputs, strides_k, index, classes, row_ok, temperature, ACC_TYPE)
    in_set = tl.load(
        inputs[2] + index.to(tl.int64)[None, :] * strides_k[2],
        mask=row_ok[:, None] & valid,
        other=0,
    ) != 0
    return a, b, in_set, valid & ~in_set


@triton.jit
def _fold_chunk(statistics, a, b, in_set, out_set):
    """Fold one chunk into the per-group statistics of both networks, into the NCKD sum
    of exp(b - max_t_out) * (b - a) over the classes outside G, and into the class counts of
    G and of its complement."""
    (max_s_in, sum_s_in, max_s_out, sum_s_out, max_t_in, sum_t_in, max_t_out, sum_t_out,
     cross_out, count_in, count_out) = statistics
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
    count_in = count_in + tl.sum(in_set.to(tl.int32), axis=1)
    count_out = count_out + tl.sum(out_set.to(tl.int32), axis=1)
    return (max_s_in, sum_s_in, max_s_out, sum_s_out, max_t_in, sum_t_in, max_t_out, sum_t_out,
            cross_out, count_in, count_out)


@triton.jit
def _log_add_exp(x, y):
    top = tl.maximum(x, y)
    shift = tl.where(top == float("-inf"), 0.0, top)
    return shift + tl.log(tl.exp(x - shift) + tl.exp(y - shift))


@triton.jit
def _gradient(a, b, in_set, out_set, row_statistics, alpha, beta, scale):
    """grad_coef * d(row loss)/d s of a tile, where scale = T / rows and row_statistics are
    (lse_s, lse_s_in, lse_s_out, lse_t_out, p_t_in, p_t_out)."""
    lse_s, lse_s_in, lse_s_out, lse_t_out, p_t_in, p_t_out = row_statistics
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
    classes = multiple_of(classes, ROW_ALIGN)
    image, row64, row_ok = program_rows(row_blocks, rows, BLOCK_R)
    chunk = tl.arange(0, BLOCK_K)
    inputs = (
        row_starts(student_ptr, image, row64, student_stride_n, student_stride_r, ROW_ALIGN),
        row_starts(teacher_ptr, image, row64, teacher_stride_n, teacher_stride_r, ROW_ALIGN),
        row_starts(mask_ptr, image, row64, mask_stride_n, mask_stride_r, ROW_ALIGN),
    )
    strides_k = (student_stride_k, teacher_stride_k, mask_stride_k)

    # In the order of _fold_chunk: per network and group, the running max and sum, then the
    # NCKD cross sum and the class counts of G and of its complement.
    no_max = tl.full((BLOCK_R,), float("-inf"), ACC_TYPE)
    no_sum = tl.zeros((BLOCK_R,), ACC_TYPE)
    no_count = tl.zeros((BLOCK_R,), tl.int32)
    statistics = (no_max, no_sum, no_max, no_sum, no_max, no_sum, no_max, no_sum, no_sum,
                  no_count, no_count)
    if SINGLE_CHUNK:
        a, b, in_set, out_set = _load_chunk(
            inputs, strides_k, chunk, classes, row_ok, temperature, ACC_TYPE
        )
        statistics = _fold_chunk(statistics, a, b, in_set, out_set)
    else:
        for start in range(0, classes, BLOCK_K):
            a, b, in_set, out_set = _load_chunk(
                inputs, strides_k, start + chunk, classes, row_ok, temperature, ACC_TYPE
            )
            statistics = _fold_chunk(statistics, a, b, in_set, out_set)
    (max_s_in, sum_s_in, max_s_out, sum_s_out, max_t_in, sum_t_in, max_t_out, sum_t_out,
     cross_out, count_in, count_out) = statistics

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
        grad_rows = row_starts(grad_ptr, image, row64, grad_stride_n, grad_stride_r, ROW_ALIGN)
        grad_scale = temperature * tl.load(scale_ptr).to(ACC_TYPE)
        row_statistics = (lse_s, lse_s_in, lse_s_out, lse_t_out, p_t_in, p_t_out)
        if SINGLE_CHUNK:
            grad = _gradient(a, b, in_set, out_set, row_statistics, alpha, beta, grad_scale)
            store_tile(grad_rows, chunk, grad_stride_k, grad, (chunk < classes)[None, :], row_ok)
        else:
            for start in range(0, classes, BLOCK_K):
                index = start + chunk
                a, b, in_set, out_set = _load_chunk(
                    inputs, strides_k, index, classes, row_ok, temperature, ACC_TYPE
                )
                grad = _gradient(a, b, in_set, out_set, row_statistics, alpha, beta, grad_scale)
                store_tile(
                    grad_rows, index, grad_stride_k, grad, (index < classes)[None, :], row_ok
                )


def decoupled_kd_loss(
    student_logits, teacher_logits, class_mask, alpha, beta, temperature, with_grad
):
    """The sokd::decoupled_kd_loss schema: (loss, d loss / d student_logits), the gradient
    normalised, contiguous and in the accumulation dtype, or empty when with_grad is false."""
    launch = RowLaunch.plan(student_logits, teacher_logits, with_grad, _MAX_TILE)
    mask_rows = image_rows(class_mask)
    scale = launch.mean_scale()
    with on_device(student_logits):
        wrap_triton(_decoupled_kd_kernel)[launch.grid](
            *launch.arguments(mask_rows, launch_strides(mask_rows), scale),
            temperature,
            alpha,
            beta,
            **launch.options(_num_warps, mask_rows),
        )
    return launch.result(scale)
