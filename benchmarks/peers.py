"""What users run today instead of sokd: KD and DKD as the common KD code bases write them, and
Liger-Kernel's fused KL divergence. Written for this benchmark; they are contenders, not
references, and are checked against sokd's reference like every other contender."""

import importlib

import torch
import torch.nn.functional as F

# The common DKD code hides the target class from the non-target softmax by subtracting a
# large constant from its logit instead of masking it out.
_HIDE_TARGET = 1000.0


def _rows(logits):
    """N x K stays; dense N x K x H x W becomes one row per position, as those code bases do."""
    if logits.dim() == 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def plain_kd(student_logits, teacher_logits, temperature):
    """Hinton KD: log_softmax / softmax / kl_div(batchmean) * T^2."""
    log_p_student = F.log_softmax(_rows(student_logits) / temperature, dim=1)
    p_teacher = F.softmax(_rows(teacher_logits) / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


def plain_dkd(student_logits, teacher_logits, target, alpha, beta, temperature):
    """DKD (Zhao et al., 2022) with target and non-target masks over the softmax."""
    student, teacher = _rows(student_logits), _rows(teacher_logits)
    is_target = torch.zeros_like(student, dtype=torch.bool)
    is_target.scatter_(1, target.reshape(-1, 1), True)
    p_student = F.softmax(student / temperature, dim=1)
    p_teacher = F.softmax(teacher / temperature, dim=1)

    def binary(p):
        inside = (p * is_target).sum(dim=1, keepdim=True)
        outside = (p * ~is_target).sum(dim=1, keepdim=True)
        return torch.cat((inside, outside), dim=1)

    tckd = F.kl_div(torch.log(binary(p_student)), binary(p_teacher), reduction="batchmean")
    hidden = _HIDE_TARGET * is_target
    log_q_student = F.log_softmax(student / temperature - hidden, dim=1)
    q_teacher = F.softmax(teacher / temperature - hidden, dim=1)
    nckd = F.kl_div(log_q_student, q_teacher, reduction="batchmean")
    return (alpha * tckd + beta * nckd) * temperature**2


def liger_kl_div_class():
    """Liger-Kernel's KL-divergence module class, or None with the reason it is absent."""
    try:
        module = importlib.import_module("liger_kernel.transformers")
    except ImportError as error:
        return None, f"liger_kernel is not installed ({error})"
    for name in ("LigerKLDIVLoss", "LigerKLDivLoss"):
        if hasattr(module, name):
            return getattr(module, name), None
    return None, "liger_kernel.transformers has no KL-divergence loss in this version"


def liger_kd(kl_div_module, student_logits, teacher_logits, temperature):
    """KD through Liger's fused KL divergence: the log-softmaxes stay in PyTorch, as in
    Liger's own distillation examples; Liger fuses the divergence and its gradient."""
    log_p_student = F.log_softmax(_rows(student_logits) / temperature, dim=1)
    log_p_teacher = F.log_softmax(_rows(teacher_logits) / temperature, dim=1)
    return kl_div_module(log_p_student, log_p_teacher) * temperature**2
