"""Logit distillation for language models in plain PyTorch: the definition (docs/algorithm.md §7).

Per row, with P = softmax(z_t / T) and Q = softmax(z_s / T) (no T^2 factor):
forward_kl = KL(P || Q), reverse_kl = KL(Q || P), jsd = beta KL(P || M) + (1 - beta) KL(Q || M)
with M = beta P + (1 - beta) Q. With a top-k teacher the divergence is taken over the (k + 1)-way
distribution of the k ids plus one tail bucket. Every term x log(x / y) with x = 0 is 0, so
masked vocabulary entries (-inf logits) contribute nothing.

Autograd differentiates this function, so higher-order gradients work; the fused kernels are
tested against it. Arguments arrive validated by `sokd.logit_distill_loss`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .common import accumulation_dtype

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Reduction = Literal["mean", "sum", "none"]


def _x_log_ratio(x: Tensor, log_x: Tensor, log_y: Tensor) -> Tensor:
    """x * (log x - log y), with 0 where x = 0 (also when log y = -inf there)."""
    present = x > 0
    return x * torch.where(present, log_x - torch.where(present, log_y, 0), 0)


def bucket_divergence(
    p: Tensor, log_p: Tensor, q: Tensor, log_q: Tensor, divergence: Divergence, beta: float
) -> Tensor:
    """The divergence of P from Q summed over the last dimension (the buckets of a row)."""
    if divergence == "forward_kl":
        return _x_log_ratio(p, log_p, log_q).sum(-1)
    if divergence == "reverse_kl":
        return _x_log_ratio(q, log_q, log_p).sum(-1)
    # log M = log(beta P + (1 - beta) Q) in log space; where both are 0 it is never used, and
    # finite stand-ins keep the unused branch's gradient from turning into NaN.
    either = (p > 0) | (q > 0)
    log_m = torch.logaddexp(
        torch.where(either, log_p, 0) + math.log(beta),
        torch.where(either, log_q, 0) + math.log1p(-beta),
    )
    teacher_side = _x_log_ratio(p, log_p, log_m)
    return (beta * teacher_side + (1 - beta) * _x_log_ratio(q, log_q, log_m)).sum(-1)


def _tail(log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """(mass, log mass) of what the k buckets leave: clamp(1 - sum(exp(log_probs)), 0)."""
    mass = (1 - log_probs.exp().sum(-1, keepdim=True)).clamp(min=0)
    return mass, torch.log(mass)


def row_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    teacher_topk: tuple[Tensor, Tensor] | None,
    divergence: Divergence,
    beta: float,
    temperature: float,
) -> Tensor:
    """The per-row divergence of 2-D rows (N x V student, N x V teacher or N x k top-k)."""
    acc = accumulation_dtype(student_logits.dtype)
    log_q = torch.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    if teacher_topk is None:
        log_p = torch.log_softmax(teacher_logits.to(acc) / temperature, dim=-1)
        return bucket_divergence(log_p.exp(), log_p, log_q.exp(), log_q, divergence, beta)
    logprobs, indices = teacher_topk
    log_p_top = logprobs.to(acc)
    log_q_top = log_q.gather(-1, indices.long())
    p_tail, log_p_tail = _tail(log_p_top)
    q_tail, log_q_tail = _tail(log_q_top)
    log_p = torch.cat([log_p_top, log_p_tail], dim=-1)
    log_q = torch.cat([log_q_top, log_q_tail], dim=-1)
    p = torch.cat([log_p_top.exp(), p_tail], dim=-1)
    q = torch.cat([log_q_top.exp(), q_tail], dim=-1)
    return bucket_divergence(p, log_p, q, log_q, divergence, beta)


def logit_distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    num_items: int | float | Tensor | None = None,
    vocab_size: int | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Reduced divergence of the student's rows from the teacher's (docs/algorithm.md §7).

    student_logits is (..., Vs); teacher_logits (..., Vt) or teacher_topk = (logprobs, ids), both
    (..., k). Rows whose label is ignore_index contribute 0. mean divides the sum by num_items,
    or else by the number of counted rows (0 when there are none); none keeps the leading shape.
    The loss is float32 (float64 for float64 inputs); only student_logits gets a gradient.
    """
    lead = student_logits.shape[:-1]
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = None
    topk = None
    if teacher_topk is not None:
        logprobs, indices = teacher_topk
        topk = (logprobs.reshape(-1, logprobs.shape[-1]).detach(),
                indices.reshape(-1, indices.shape[-1]))
    else:
        teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
    if vocab_size is not None:
        student = student[:, :vocab_size]
        if teacher is not None:
            teacher = teacher[:, :vocab_size]
    rows = row_divergence(student, teacher, topk, divergence, beta, temperature)
    if labels is not None:
        counted = labels.reshape(-1) != ignore_index
        rows = torch.where(counted, rows, 0)
        count = counted.sum()
    else:
        count = torch.tensor(rows.shape[0], device=rows.device)
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    denominator = count if num_items is None else torch.as_tensor(num_items, device=rows.device)
    denominator = denominator.to(rows.dtype)
    nonzero = denominator != 0
    return torch.where(nonzero, total / torch.where(nonzero, denominator, 1), 0)
