"""sokd.fused_linear_distill_loss: logit distillation through the LM heads, chunk by chunk
(docs/algorithm.md §7).

The loss equals logit_distill_loss(h_s W_s^T + b_s, h_t W_t^T + b_t, ...), but the N x V logits
of either model exist only one chunk of rows at a time. This module holds the typed public
function and module, which validate the arguments and run the selected backend. The op
`sokd::fused_linear_distill_loss` has its schema in csrc/fused_linear_distill_loss.cpp, one
kernel for every device in csrc/composite/fused_linear_distill_loss_kernel.cpp (matmuls and the
row op sokd::logit_distill_loss, chunk by chunk) and its autograd in csrc/autograd.cpp.
"""

from __future__ import annotations


from torch import Tensor

from .. import _validation as check
from .._backend import backend_for
from .logit_distill_loss import (
    DistillLossModule,
    Divergence,
    Reduction,
    check_common,
    check_labels,
    check_num_items,
    check_vocab_size,
)

# Default rows per chunk: about this many logits per chunk and model (128 MiB in float32),
# large enough for the matmuls to run at full speed.
CHUNK_ELEMENTS = 1 << 25


def default_chunk_size(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _check_linear(hidden: object, hidden_name: str, weight: object, weight_name: str,
                  bias: object, bias_name: str, reference_tensor: Tensor | None) -> None:
    check.tensor(hidden, hidden_name, None)
    if hidden.dim() < 2:
        raise ValueError(f"{hidden_name} must be (..., D), got shape {tuple(hidden.shape)}")
    check.tensor(weight, weight_name, 2, "V x D")
    check.same_device(weight, weight_name, hidden, hidden_name)
    check.same_dtype(weight, weight_name, hidden, hidden_name)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} must be V x D with D = {hidden.shape[-1]} (the last dimension of "
            f"{hidden_name}), got shape {tuple(weight.shape)}"
        )
    if bias is not None:
        check.tensor(bias, bias_name, 1, "V")
        check.same_device(bias, bias_name, hidden, hidden_name)
        check.same_dtype(bias, bias_name, hidden, hidden_name)
        check.shape(bias, bias_name, (weight.shape[0],), f"one value per row of {weight_name}")
    if reference_tensor is not None:
        check.same_device(hidden, hidden_name, reference_tensor, "student_hidden")
        check.same_dtype(hidden, hidden_name, reference_tensor, "student_hidden")


def fused_linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    num_items: int | float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """logit_distill_loss(h_s W_s^T + b_s, h_t W_t^T + b_t, ...) without the N x V logits.

    Shapes: student_hidden (..., Ds), student_weight Vs x Ds, student_bias Vs; teacher_hidden
    (..., Dt) with the same leading shape, teacher_weight Vt x Dt, teacher_bias Vt. The rows are
    processed chunk_size at a time (default: about 2^25 logits per chunk), so the peak extra
    memory is a few chunks of logits instead of several N x V tensors. All tensors share one
    dtype and device; the loss is float32 (float64 for float64).

    Options as in `logit_distill_loss` (teacher_topk excepted: use that op with precomputed
    student logits). Gradients reach student_hidden, student_weight and student_bias; the
    teacher gets none. Defined in docs/algorithm.md §7.
    """
    _check_linear(student_hidden, "student_hidden", student_weight, "student_weight",
                  student_bias, "student_bias", None)
    _check_linear(teacher_hidden, "teacher_hidden", teacher_weight, "teacher_weight",
                  teacher_bias, "teacher_bias", student_hidden)
    lead = tuple(student_hidden.shape[:-1])
    if tuple(teacher_hidden.shape[:-1]) != lead:
        raise ValueError(
            f"teacher_hidden must have the leading shape {lead} of student_hidden, got "
            f"{tuple(teacher_hidden.shape)}"
        )
    beta, temperature = check_common(divergence, beta, temperature, ignore_index, reduction)
    device = student_hidden.device
    rows = student_hidden.numel() // student_hidden.shape[-1]
    vocab = check_vocab_size(vocab_size, student_weight.shape[0], teacher_weight.shape[0])
    label_rows = check_labels(labels, rows, lead, device)
    num_items_tensor = check_num_items(num_items, device)
    if chunk_size is None:
        chunk_size = default_chunk_size(max(student_weight.shape[0], teacher_weight.shape[0]))
    chunk_size = check.positive_int(chunk_size, "chunk_size")

    loss = backend_for("fused_linear_distill_loss", device).fused_linear_distill_loss(
        student_hidden.reshape(rows, -1), student_weight, teacher_hidden.reshape(rows, -1),
        teacher_weight, student_bias, teacher_bias, chunk_size=chunk_size,
        divergence=divergence, beta=beta, temperature=temperature, labels=label_rows,
        ignore_index=int(ignore_index), reduction=reduction, num_items=num_items_tensor,
        vocab_size=vocab,
    )
    return loss.reshape(lead) if reduction == "none" else loss


class FusedLinearDistillLoss(DistillLossModule):
    """Module form of `fused_linear_distill_loss` (docs/algorithm.md §7): the options are fixed
    at construction; forward(student_hidden, student_weight, teacher_hidden, teacher_weight,
    student_bias=None, teacher_bias=None, labels=None, num_items=None) returns the loss."""

    def __init__(
        self,
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        vocab_size: int | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(divergence, beta, temperature, ignore_index, reduction, vocab_size)
        self.chunk_size = chunk_size

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        labels: Tensor | None = None,
        num_items: int | float | Tensor | None = None,
    ) -> Tensor:
        return fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
            teacher_bias, chunk_size=self.chunk_size, divergence=self.divergence, beta=self.beta,
            temperature=self.temperature, labels=labels, ignore_index=self.ignore_index,
            reduction=self.reduction, num_items=num_items, vocab_size=self.vocab_size,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"
