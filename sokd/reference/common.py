import torch


def accumulation_dtype(dtype):
    """The accumulation rule of every backend (docs/algorithm.md §7, Precision): float64
    accumulates in float64 (so gradcheck is exact), every other floating type in float32, and
    a loss comes back in that type. csrc/accumulation.h is the same rule for the C++ kernels."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logit_rows(logits):
    """N x K stays as is; dense N x K x H x W becomes (N*H*W) x K, one row per position."""
    if logits.dim() == 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def safe_divide(numerator, denominator):
    """numerator / denominator, and 0 (with gradient 0) where the denominator is 0."""
    nonzero = denominator != 0
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, 1), 0)
