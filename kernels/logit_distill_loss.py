"""The Triton kernel of sokd::logit_distill_loss (docs/algorithm.md §7): the CUDA implementation.

Per row, with u = z_s / T, v = z_t / T, Q = softmax(u), P = softmax(v) (no T^2 factor):
    forward_kl  D = sum P (log P - log Q)           G = -P
    reverse_kl  D = sum Q (log Q - log P)           G = Q (log Q - log P + 1)
    jsd         D = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q
                                                    G = (1 - beta) Q (log Q - log M)
    d D / d u_m = G_m - Q_m sum(G), and d loss / d z_s = (d loss / d D) / T times that.
With a top-k teacher the sums run over the k ids plus a tail bucket; outside the ids the
gradient is Q_m (a_tail sum(Q_ids) - sum(G)) with a_tail = dD / dQ_tail (0 when the student's
tail is clamped to 0), and at id i it is G_i - Q_i (sum(G) + a_tail (1 - sum(Q_ids))).

One program per row walks the vocabulary in blocks. The KLs take two passes: online softmax
statistics together with the loss (its cross term rescaled as the maximum moves), then the
gradient. JSD needs both normalisers before its terms, so it takes a third: statistics, terms
and sum(G), gradient. Offsets are 64-bit (N x V passes
2^31 elements at 16k x 128k); every sum accumulates in float32 (float64 for float64 inputs).

The launcher returns the op's (loss, grad) contract: loss is the mean/sum scalar or the N row
values; grad is d loss / d student_logits (per row for "none"), zero on ignored rows and beyond
vocab_size. The scale 1 / (num_items or the counted rows) stays on the device (no sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sokd.reference.common import accumulation_dtype

from ._common import accumulator_type, num_warps_for
from ._online_softmax import log_sum_exp, merge_chunk

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
_DIVERGENCE_CODES = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "jsd": JSD}
# Vocabulary block of one program: a (1 x BLOCK_V) tile per model.
MAX_BLOCK_V = 4096


@triton.jit
def _scaled_block(row_ptr, cols, valid, inv_temperature, ACC_TYPE: tl.constexpr):
    """A (1 x BLOCK_V) tile of logits / T, -inf outside the vocabulary."""
    values = tl.load(row_ptr + cols, mask=valid, other=0).to(ACC_TYPE)
    return tl.where(valid, values * inv_temperature, float("-inf"))


@triton.jit
def _log_probs(row_ptr, cols, valid, inv_temperature, lse, ACC_TYPE: tl.constexpr):
    """A (1 x BLOCK_V) tile of log softmax(logits / T), given the row's log-sum-exp `lse`."""
    return _scaled_block(row_ptr, cols, valid, inv_temperature, ACC_TYPE) - lse[:, None]


@triton.jit
def _x_log_ratio(x, log_x, log_y):
    """x (log x - log y), 0 where x = 0."""
    present = x > 0
    return tl.where(present, x * (log_x - tl.where(present, log_y, 0.0)), 0.0)


@triton.jit
def _bucket_terms(p, log_p, q, log_q, beta, DIVERGENCE: tl.constexpr):
    """(divergence term, G = Q dD/dQ) per entry."""
    if DIVERGENCE == 0:
        term = _x_log_ratio(p, log_p, log_q)
        g = -p
    elif DIVERGENCE == 1:
        term = _x_log_ratio(q, log_q, log_p)
        g = term + q
    else:
        log_m = tl.log(beta * p + (1 - beta) * q)
        student_side = _x_log_ratio(q, log_q, log_m)
        term = beta * _x_log_ratio(p, log_p, log_m) + (1 - beta) * student_side
        g = (1 - beta) * student_side
    return term, g


@triton.jit
def _zero_columns(grad_row, first, width, cols_base, BLOCK_V: tl.constexpr):
    for start in range(first, width, BLOCK_V):
        cols = start + cols_base
        tl.store(grad_row + cols, tl.zeros_like(cols).to(grad_row.dtype.element_ty),
                 mask=cols < width)


@triton.jit
def _tail_slope(p, log_p, q, log_q, beta, DIVERGENCE: tl.constexpr):
    """dD/dQ of the tail bucket; 0 when the student's tail is empty."""
    safe_q = tl.where(q > 0, q, 1.0)
    if DIVERGENCE == 0:
        slope = -p / safe_q
    elif DIVERGENCE == 1:
        slope = log_q - log_p + 1
    else:
        slope = (1 - beta) * (log_q - tl.log(beta * p + (1 - beta) * q))
    return tl.where(q > 0, slope, 0.0)


@triton.jit
def _logit_distill_kernel(
    student_ptr,
    teacher_ptr,
    indices_ptr,
    labels_ptr,
    scale_ptr,
    grad_ptr,
    row_loss_ptr,
    vocab,
    width,
    student_stride,
    teacher_stride,
    k,
    inv_temperature,
    beta,
    ignore_index,
    DIVERGENCE: tl.constexpr,
    TOPK: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ACC_TYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # teacher_ptr holds the teacher's logits (rows teacher_stride apart), or with TOPK its k
    # log-probabilities per row, whose vocabulary ids are at indices_ptr.
    row = tl.program_id(0).to(tl.int64)
    counted = True
    if HAS_LABELS:
        counted = tl.load(labels_ptr + row) != ignore_index
    cols_base = tl.arange(0, BLOCK_V)[None, :]
    student_row = student_ptr + row * student_stride
    teacher_row = teacher_ptr + row * teacher_stride
    grad_row = grad_ptr + row * width
    coef = tl.load(scale_ptr).to(ACC_TYPE) * inv_temperature
    loss = tl.zeros((1,), ACC_TYPE)
    if counted:
        if TOPK:
            max_s = tl.full((1,), float("-inf"), ACC_TYPE)
            sum_s = tl.zeros((1,), ACC_TYPE)
            for start in range(0, vocab, BLOCK_V):
                cols = start + cols_base
                u = _scaled_block(student_row, cols, cols < vocab, inv_temperature, ACC_TYPE)
                max_s, sum_s, _, _ = merge_chunk(max_s, sum_s, u)
            lse_s = log_sum_exp(max_s, sum_s)[:, None]

            slots = tl.arange(0, BLOCK_K)[None, :]
            in_k = slots < k
            ids = tl.load(indices_ptr + row * k + slots, mask=in_k, other=0)
            log_q = _scaled_block(student_row, ids, in_k, inv_temperature, ACC_TYPE) - lse_s
            log_p = tl.load(teacher_ptr + row * k + slots, mask=in_k, other=float("-inf"))
            log_p = log_p.to(ACC_TYPE)
            q = tl.exp(log_q)
            p = tl.exp(log_p)
            term, g = _bucket_terms(p, log_p, q, log_q, beta, DIVERGENCE)
            term = tl.where(in_k, term, 0.0)
            g = tl.where(in_k, g, 0.0)
            q_sum = tl.sum(q, axis=1)
            p_tail = tl.maximum(1 - tl.sum(p, axis=1), 0.0)
            q_tail = tl.maximum(1 - q_sum, 0.0)
            log_p_tail = tl.log(p_tail)
            log_q_tail = tl.log(q_tail)
            tail_term, _ = _bucket_terms(p_tail, log_p_tail, q_tail, log_q_tail, beta, DIVERGENCE)
            loss = tl.sum(term, axis=1) + tail_term
            if COMPUTE_GRAD:
                g_total = tl.sum(g, axis=1)
                a_tail = _tail_slope(p_tail, log_p_tail, q_tail, log_q_tail, beta, DIVERGENCE)
                outside = (coef * (a_tail * q_sum - g_total))[:, None]
                for start in range(0, vocab, BLOCK_V):
                    cols = start + cols_base
                    valid = cols < vocab
                    u = _scaled_block(student_row, cols, valid, inv_temperature, ACC_TYPE)
                    tl.store(grad_row + cols, (tl.exp(u - lse_s) * outside).to(
                        grad_ptr.dtype.element_ty), mask=valid)
                _zero_columns(grad_row, vocab, width, cols_base, BLOCK_V)
                # The ids overwrite what the vocabulary pass wrote there: its stores must land
                # first.
                tl.debug_barrier()
                shared = (g_total + a_tail * (1 - q_sum))[:, None]
                tl.store(grad_row + ids, (coef * (g - q * shared)).to(grad_ptr.dtype.element_ty),
                         mask=in_k)
        else:
            max_s = tl.full((1,), float("-inf"), ACC_TYPE)
            max_t = tl.full((1,), float("-inf"), ACC_TYPE)
            sum_s = tl.zeros((1,), ACC_TYPE)
            sum_t = tl.zeros((1,), ACC_TYPE)
            # The KLs also gather sum e (x - y) here, with e the exponentials of the weighting side
            # (the teacher for forward KL, the student for reverse KL) against its running maximum.
            cross = tl.zeros((1,), ACC_TYPE)
            for start in range(0, vocab, BLOCK_V):
                cols = start + cols_base
                valid = cols < vocab
                u = _scaled_block(student_row, cols, valid, inv_temperature, ACC_TYPE)
                v = _scaled_block(teacher_row, cols, valid, inv_temperature, ACC_TYPE)
                max_s, sum_s, rescale_s, shift_s = merge_chunk(max_s, sum_s, u)
                max_t, sum_t, rescale_t, shift_t = merge_chunk(max_t, sum_t, v)
                if DIVERGENCE == 0:
                    weights = tl.exp(v - shift_t[:, None])
                    cross = cross * rescale_t + tl.sum(_x_log_ratio(weights, v, u), axis=1)
                elif DIVERGENCE == 1:
                    weights = tl.exp(u - shift_s[:, None])
                    cross = cross * rescale_s + tl.sum(_x_log_ratio(weights, u, v), axis=1)
            lse_s = log_sum_exp(max_s, sum_s)
            lse_t = log_sum_exp(max_t, sum_t)
            if DIVERGENCE == 0:
                loss = cross / sum_t - lse_t + lse_s
            elif DIVERGENCE == 1:
                loss = cross / sum_s - lse_s + lse_t
            else:
                # JSD needs both normalisers before its terms: a second pass, and its gradient
                # needs the row's sum(G): a third.
                g_total = tl.zeros((1,), ACC_TYPE)
                for start in range(0, vocab, BLOCK_V):
                    cols = start + cols_base
                    valid = cols < vocab
                    log_q = _log_probs(student_row, cols, valid, inv_temperature, lse_s, ACC_TYPE)
                    log_p = _log_probs(teacher_row, cols, valid, inv_temperature, lse_t, ACC_TYPE)
                    term, g = _bucket_terms(tl.exp(log_p), log_p, tl.exp(log_q), log_q, beta, 2)
                    loss += tl.sum(term, axis=1)
                    g_total += tl.sum(g, axis=1)
            if COMPUTE_GRAD:
                for start in range(0, vocab, BLOCK_V):
                    cols = start + cols_base
                    valid = cols < vocab
                    log_q = _log_probs(student_row, cols, valid, inv_temperature, lse_s, ACC_TYPE)
                    log_p = _log_probs(teacher_row, cols, valid, inv_temperature, lse_t, ACC_TYPE)
                    q = tl.exp(log_q)
                    if DIVERGENCE == 0:
                        grad = q - tl.exp(log_p)
                    elif DIVERGENCE == 1:
                        grad = tl.where(q > 0, q * (log_q - log_p - loss[:, None]), 0.0)
                    else:
                        _, g = _bucket_terms(tl.exp(log_p), log_p, q, log_q, beta, 2)
                        grad = g - q * g_total[:, None]
                    tl.store(grad_row + cols, (coef * grad).to(grad_ptr.dtype.element_ty),
                             mask=valid)
                _zero_columns(grad_row, vocab, width, cols_base, BLOCK_V)
    elif COMPUTE_GRAD:
        _zero_columns(grad_row, 0, width, cols_base, BLOCK_V)
    tl.store(row_loss_ptr + row + tl.arange(0, 1), loss)


def _reduction_scale(labels, ignore_index, reduction, num_items, rows, device, dtype):
    """d loss / d row loss as a one-element tensor: 1 / (num_items or counted rows) for
    "mean" (0 when that is 0), else 1."""
    if reduction != "mean":
        return torch.ones(1, dtype=dtype, device=device)
    if num_items is not None:
        denominator = num_items.to(device=device, dtype=dtype).reshape(1)
    elif labels is not None:
        denominator = (labels != ignore_index).sum().to(dtype).reshape(1)
    else:
        denominator = torch.full((1,), float(rows), dtype=dtype, device=device)
    nonzero = denominator != 0
    return torch.where(nonzero, 1 / torch.where(nonzero, denominator, 1), 0)


def logit_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    teacher_indices: torch.Tensor | None,
    labels: torch.Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
    num_items: torch.Tensor | None,
    vocab_size: int,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the row kernel on N x Vs student rows (the sokd::logit_distill_loss contract in
    csrc/logit_distill_loss.cpp); inputs are validated by sokd.logit_distill_loss."""
    student = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    rows, width = student.shape
    device = student.device
    acc_dtype = accumulation_dtype(student.dtype)
    grad = (
        torch.empty((rows, width), dtype=student.dtype, device=device)
        if with_grad else student.new_empty(0)
    )
    row_loss = torch.empty(rows, dtype=acc_dtype, device=device)
    scale = _reduction_scale(labels, ignore_index, reduction, num_items, rows, device, acc_dtype)
    block_v = min(triton.next_power_of_2(vocab_size), MAX_BLOCK_V)
    labels_arg = labels.contiguous() if labels is not None else row_loss
    if teacher_logits is not None:
        teacher = teacher_logits if teacher_logits.stride(-1) == 1 else teacher_logits.contiguous()
        indices, k, teacher_stride, block_k = None, 0, teacher.stride(0), 1
    else:
        teacher, indices = teacher_logprobs.contiguous(), teacher_indices.contiguous()
        k, teacher_stride, block_k = teacher.shape[1], 0, triton.next_power_of_2(teacher.shape[1])
    if rows > 0:
        _logit_distill_kernel[(rows,)](
            student, teacher, indices, labels_arg, scale, grad if with_grad else row_loss,
            row_loss, vocab_size, width, student.stride(0), teacher_stride, k,
            1.0 / temperature, beta, ignore_index,
            DIVERGENCE=_DIVERGENCE_CODES[divergence],
            TOPK=teacher_logits is None,
            HAS_LABELS=labels is not None,
            COMPUTE_GRAD=with_grad,
            ACC_TYPE=accumulator_type(student.dtype),
            BLOCK_V=block_v,
            BLOCK_K=block_k,
            num_warps=num_warps_for(block_v),
        )
    if reduction == "none":
        return row_loss, grad
    return row_loss.sum() * scale[0], grad
