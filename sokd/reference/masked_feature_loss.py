"""Reference masked_feature_loss (docs/algorithm.md §5); autograd gives its gradients."""

from .common import accumulation_dtype, safe_divide


def masked_feature_loss(student, teacher, mask, normalize):
    acc = accumulation_dtype(student.dtype)
    squared = (student.to(acc) - teacher.to(acc)).square()
    channels = student.shape[1]
    if mask is None:
        return squared.sum() / squared.numel()
    mask_sq = mask.to(acc).square()
    total = (squared * mask_sq[:, None]).sum()
    if normalize == "elements":
        return total / squared.numel()
    return safe_divide(total, channels * mask_sq.sum())
