"""Reference kd_loss (docs/algorithm.md §5), written for clarity; autograd gives gradients."""

import torch

from .common import accumulation_dtype, logit_rows, safe_divide


def _row_weights_mean(per_row, weight):
    if weight is None:
        return per_row.mean()
    w = weight.reshape(-1).to(per_row.dtype)
    return safe_divide((w * per_row).sum(), w.sum())


def kd_loss(student, teacher, temperature, weight):
    acc = accumulation_dtype(student.dtype)
    log_p_student = torch.log_softmax(logit_rows(student).to(acc) / temperature, dim=1)
    log_p_teacher = torch.log_softmax(logit_rows(teacher.detach()).to(acc) / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return _row_weights_mean(kl, weight) * temperature**2
