"""Reference decoupled_kd_loss (docs/algorithm.md §5); autograd gives its gradients."""

import torch

from .common import accumulation_dtype, logit_rows


def _log_normaliser(values, keep):
    """Per row, over the kept entries: the maximum m and log sum exp(values - m).

    They stay apart because m + log-sum rounds to the spacing of m: at |z|/T ~ 1e5 in
    float32 that error alone shifts a softmax by a percent. Rows that keep nothing get
    finite dummies, flagged by `has_any`, so no NaN reaches the backward pass."""
    has_any = keep.any(dim=1)
    keep_safe = keep | ~has_any[:, None]
    masked = values.masked_fill(~keep_safe, float("-inf"))
    peak = masked.max(dim=1, keepdim=True).values.detach()
    return peak[:, 0], torch.logsumexp(masked - peak, dim=1), has_any


def _decoupled_terms(z, in_set):
    """log p_G, log(1 - p_G) and the log-softmax over the complement, for one network."""
    peak_all, log_sum_all, _ = _log_normaliser(z, torch.ones_like(in_set))
    peak_in, log_sum_in, has_in = _log_normaliser(z, in_set)
    peak_out, log_sum_out, has_out = _log_normaliser(z, ~in_set)
    log_p_in = (peak_in - peak_all) + (log_sum_in - log_sum_all)
    log_p_out = (peak_out - peak_all) + (log_sum_out - log_sum_all)
    log_q_out = torch.where(in_set, 0.0, (z - peak_out[:, None]) - log_sum_out[:, None])
    return log_p_in, log_p_out, log_q_out, has_in, has_out


def decoupled_kd_loss(student, teacher, class_mask, alpha, beta, temperature):
    acc = accumulation_dtype(student.dtype)
    zs = logit_rows(student).to(acc) / temperature
    zt = logit_rows(teacher.detach()).to(acc) / temperature
    in_set = logit_rows(class_mask)
    s_in, s_out, s_q, has_in, has_out = _decoupled_terms(zs, in_set)
    t_in, t_out, t_q, _, _ = _decoupled_terms(zt, in_set)

    tckd = torch.where(has_in, t_in.exp() * (t_in - s_in), 0.0) + torch.where(
        has_out, t_out.exp() * (t_out - s_out), 0.0
    )
    nckd_terms = torch.where(in_set, 0.0, t_q.exp() * (t_q - s_q))
    nckd = torch.where(has_out, nckd_terms.sum(dim=1), 0.0)
    return (alpha * tckd + beta * nckd).mean() * temperature**2
