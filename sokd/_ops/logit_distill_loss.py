"""sokd.logit_distill_loss: logit distillation for language models (docs/algorithm.md §7).

The typed public function and module: they validate the arguments, then run the backend that
sokd.set_backend selects (sokd/_backend.py). The op `sokd::logit_distill_loss` has its schema in
csrc/logit_distill_loss.cpp, its CPU kernel in csrc/cpu/logit_distill_loss_kernel.cpp, its CUDA
kernel in kernels/logit_distill_loss.py (Triton) and its autograd in csrc/autograd.cpp, like
every other sokd:: op.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from torch import Tensor

from .. import _validation as check
from .._backend import backend_for
from ..reference.common import accumulation_dtype

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Reduction = Literal["mean", "sum", "none"]
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
# Top-k log-probabilities above 0 by more than this are an error, not rounding.
LOGPROB_TOLERANCE = 1e-4


def _check_integer_tensor(value: object, name: str, device: torch.device) -> Tensor:
    check.tensor_of(value, name, check.INTEGER_DTYPES, "an integer tensor")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but student_logits is on {device}")
    return value


def _reads_values() -> bool:
    """Value checks (labels, ids, num_items) need real data, which tracing does not have."""
    return not torch.compiler.is_compiling()


def check_num_items(num_items: object, device: torch.device) -> Tensor | None:
    """num_items as a one-element float64 tensor on `device` (or None)."""
    if num_items is None:
        return None
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1 or num_items.is_complex() or num_items.dtype == torch.bool:
            raise ValueError(
                f"num_items must be a number or a one-element real tensor, got "
                f"{num_items.dtype} of shape {tuple(num_items.shape)}"
            )
        if _reads_values() and num_items.device.type == "cpu" and float(num_items) < 0:
            raise ValueError(f"num_items must be >= 0, got {float(num_items)}")
        return num_items.reshape(()).to(device=device, dtype=torch.float64)
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
        raise TypeError(f"num_items must be a number or a tensor, got {type(num_items).__name__}")
    if not num_items >= 0:  # also refuses NaN
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    return torch.scalar_tensor(num_items, dtype=torch.float64, device=device)


def check_common(
    divergence: object,
    beta: object,
    temperature: object,
    ignore_index: object,
    reduction: object,
) -> tuple[float, float]:
    """Checks the options shared with fused_linear_distill_loss; returns (beta, temperature)."""
    check.choice(divergence, "divergence", DIVERGENCES)
    check.choice(reduction, "reduction", REDUCTIONS)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a real number, got {type(beta).__name__}")
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1) (the JSD mixture weight), got {beta}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    # Comparisons rather than math.isfinite, which torch.compile cannot trace: NaN fails both.
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return float(beta), float(temperature)


def check_labels(labels: object, rows: int, lead: tuple, device: torch.device) -> Tensor | None:
    """labels as int64 N (one per row) or None."""
    if labels is None:
        return None
    labels = _check_integer_tensor(labels, "labels", device)
    if labels.numel() != rows or (labels.dim() > 1 and tuple(labels.shape) != lead):
        raise ValueError(
            f"labels must hold one label per row: shape {lead} or ({rows},), got "
            f"{tuple(labels.shape)}"
        )
    return labels.reshape(rows).long()


def check_vocab_size(vocab_size: object, student_vocab: int, teacher_vocab: int | None) -> int:
    if vocab_size is None:
        if teacher_vocab is not None and teacher_vocab != student_vocab:
            raise ValueError(
                f"student_logits has {student_vocab} columns but teacher_logits has "
                f"{teacher_vocab}; pass vocab_size to cut both to the shared vocabulary"
            )
        return student_vocab
    vocab_size = check.positive_int(vocab_size, "vocab_size")
    limit = student_vocab if teacher_vocab is None else min(student_vocab, teacher_vocab)
    if vocab_size > limit:
        raise ValueError(
            f"vocab_size must be at most {limit} (student_logits has {student_vocab} columns"
            + ("" if teacher_vocab is None else f", teacher_logits {teacher_vocab}")
            + f"), got {vocab_size}"
        )
    return vocab_size


def _check_topk(teacher_topk: object, lead: tuple, rows: int, vocab: int,
                device: torch.device, acc_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(logprobs in acc_dtype, int64 ids), both N x k."""
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk must be a pair (logprobs, indices) of tensors")
    logprobs, indices = teacher_topk
    check.tensor(logprobs, "teacher_topk logprobs", None)
    indices = _check_integer_tensor(indices, "teacher_topk indices", device)
    if logprobs.device != device:
        raise ValueError(
            f"teacher_topk logprobs is on {logprobs.device} but student_logits is on {device}"
        )
    if logprobs.dim() < 1 or tuple(logprobs.shape[:-1]) != lead:
        raise ValueError(
            f"teacher_topk logprobs must have shape {lead} x k (one row per student row), got "
            f"{tuple(logprobs.shape)}"
        )
    if tuple(indices.shape) != tuple(logprobs.shape):
        raise ValueError(
            f"teacher_topk indices must have the shape of the logprobs {tuple(logprobs.shape)}, "
            f"got {tuple(indices.shape)}"
        )
    k = logprobs.shape[-1]
    if k > vocab:
        raise ValueError(f"teacher_topk holds k = {k} ids per row, more than vocab_size {vocab}")
    logprobs = logprobs.detach().reshape(rows, k)
    indices = indices.reshape(rows, k).long()
    if _reads_values():
        if bool((indices < 0).any()) or bool((indices >= vocab).any()):
            raise ValueError(f"teacher_topk indices must be token ids in [0, {vocab - 1}]")
        ordered = indices.sort(dim=1).values
        if k > 1 and bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("teacher_topk indices must not repeat an id within a row")
        if bool((logprobs > LOGPROB_TOLERANCE).any()):
            raise ValueError(
                "teacher_topk logprobs must be log-probabilities (<= 0), got a value of "
                f"{float(logprobs.max()):.4g}"
            )
    return logprobs.to(acc_dtype), indices


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
    """D(P, Q) per row, reduced: P = softmax(z_t / T), Q = softmax(z_s / T), no T^2 factor.

    divergence: "forward_kl" KL(P || Q), "reverse_kl" KL(Q || P), or "jsd"
    beta KL(P || M) + (1 - beta) KL(Q || M) with M = beta P + (1 - beta) Q, 0 < beta < 1.

    Shapes: student_logits (..., Vs), teacher_logits (..., Vt); leading dimensions are rows.
    Both are cut to their first vocab_size columns (required when Vs != Vt). Instead of
    teacher_logits, teacher_topk = (logprobs, ids), both (..., k), gives the teacher's
    log-probabilities at temperature T for k distinct ids per row; the divergence is then taken
    over the k ids plus one tail bucket.

    labels (...,) marks rows to skip with ignore_index: they contribute 0 with gradient 0.
    reduction "mean" divides the sum by num_items (the global token count under gradient
    accumulation or data parallelism) or else by the number of counted rows, and is 0 with a
    zero gradient when that is 0; "sum" adds; "none" returns the leading shape.

    Any floating dtype; teacher_logits shares student_logits' dtype. The loss is float32
    (float64 for float64 inputs), accumulated in that type. Only student_logits gets a
    gradient, computed in the forward pass by the fused kernels (differentiable once there;
    the reference backend differentiates further). Defined in docs/algorithm.md §7.
    """
    check.tensor(student_logits, "student_logits", None)
    if student_logits.dim() < 2:
        raise ValueError(
            f"student_logits must be (..., V) with at least one leading dimension, got shape "
            f"{tuple(student_logits.shape)}"
        )
    beta, temperature = check_common(divergence, beta, temperature, ignore_index, reduction)
    device = student_logits.device
    lead = tuple(student_logits.shape[:-1])
    student_vocab = student_logits.shape[-1]
    rows = student_logits.numel() // student_vocab
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("give exactly one of teacher_logits and teacher_topk")
    teacher_vocab = None
    if teacher_logits is not None:
        check.tensor(teacher_logits, "teacher_logits", None)
        check.same_device(teacher_logits, "teacher_logits", student_logits, "student_logits")
        check.same_dtype(teacher_logits, "teacher_logits", student_logits, "student_logits")
        if tuple(teacher_logits.shape[:-1]) != lead:
            raise ValueError(
                f"teacher_logits must have the leading shape {lead} of student_logits "
                f"(one row per student row), got {tuple(teacher_logits.shape)}"
            )
        teacher_vocab = teacher_logits.shape[-1]
    vocab = check_vocab_size(vocab_size, student_vocab, teacher_vocab)
    label_rows = check_labels(labels, rows, lead, device)
    num_items_tensor = check_num_items(num_items, device)
    acc_dtype = accumulation_dtype(student_logits.dtype)
    topk = (
        None if teacher_topk is None
        else _check_topk(teacher_topk, lead, rows, vocab, device, acc_dtype)
    )

    teacher_rows = None if teacher_logits is None else teacher_logits.reshape(rows, teacher_vocab)
    loss = backend_for("logit_distill_loss", device).logit_distill_loss(
        student_logits.reshape(rows, student_vocab), teacher_rows, divergence=divergence,
        beta=beta, temperature=temperature, labels=label_rows, ignore_index=int(ignore_index),
        reduction=reduction, num_items=num_items_tensor, vocab_size=vocab, teacher_topk=topk,
    )
    return loss.reshape(lead) if reduction == "none" else loss


class DistillLossModule(torch.nn.Module):
    """The options of a logit distillation loss module, checked once at construction."""

    def __init__(
        self,
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.beta, self.temperature = check_common(
            divergence, beta, temperature, ignore_index, reduction
        )
        self.divergence = divergence
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.vocab_size = vocab_size

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
            f"reduction={self.reduction!r}"
        )


class LogitDistillLoss(DistillLossModule):
    """Module form of `logit_distill_loss` (docs/algorithm.md §7): the options are fixed at
    construction; forward(student_logits, teacher_logits=None, labels=None, num_items=None,
    teacher_topk=None) returns the loss."""

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        num_items: int | float | Tensor | None = None,
        teacher_topk: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        return logit_distill_loss(
            student_logits, teacher_logits, divergence=self.divergence, beta=self.beta,
            temperature=self.temperature, labels=labels, ignore_index=self.ignore_index,
            reduction=self.reduction, num_items=num_items, vocab_size=self.vocab_size,
            teacher_topk=teacher_topk,
        )
