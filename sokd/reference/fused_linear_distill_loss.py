"""Reference fused_linear_distill_loss: the logits made in full, then logit_distill_loss
(docs/algorithm.md §7)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .logit_distill_loss import logit_distill_loss


def fused_linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    **options: object,
) -> Tensor:
    """logit_distill_loss(h_s W_s^T + b_s, h_t W_t^T + b_t, **options) on N x D hidden rows,
    with the options of logit_distill_loss. The reference makes all N x V logits at once, so
    chunk_size does not apply."""
    del chunk_size
    return logit_distill_loss(
        F.linear(student_hidden, student_weight, student_bias),
        F.linear(teacher_hidden, teacher_weight, teacher_bias),
        **options,
    )
