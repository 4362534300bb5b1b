"""sokd.fused_linear_distill_loss: logit distillation through the LM heads, chunk by chunk
(docs/algorithm.md §7).

The loss equals logit_distill_loss(h_s W_s^T + b_s, h_t W_t^T + b_t, ...), but the N x V logits
of either model exist only one chunk of rows at a time. Each chunk runs the row kernel, which
returns the logit gradient g of the chunk beside its loss, and turns it into the parameter
gradients at once: grad h_s = g W_s, grad W_s += g^T h_s, grad b_s += sum of g over rows.

The op `sokd::fused_linear_distill_loss` is defined here in Python (it composes matmuls and the
row op), with a fake for torch.compile and its autograd: for "mean" and "sum" the forward saves
the three gradients and backward scales them; for "none" backward reruns the chunks with the
per-row grad_output, so no N x V tensor is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

import sokd.reference.logit_distill_loss as reference

from .. import _validation as check
from ..reference.common import accumulation_dtype
from .logit_distill_loss import (
    DistillLossModule,
    Divergence,
    Reduction,
    check_common,
    check_labels,
    check_num_items,
    check_vocab_size,
    first_order_only,
    scale_saved_grad,
    use_reference,
)

_OP_NAME = "sokd::fused_linear_distill_loss"
# Default rows per chunk: about this many logits per chunk and model (128 MiB in float32),
# large enough for the matmuls to run at full speed.
CHUNK_ELEMENTS = 1 << 25


def default_chunk_size(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _linear(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())


@torch.library.custom_op(_OP_NAME, mutates_args=())
def _fused_linear_op(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    labels: Tensor | None,
    row_scale: Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
    num_items: Tensor | None,
    vocab_size: int,
    chunk_size: int,
    with_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad hidden, grad weight, grad bias) of the student; the gradients are empty
    without with_grad. row_scale, given for reduction "none", multiplies each row's logit
    gradient (the grad_output of the per-row losses)."""
    rows = student_hidden.shape[0]
    grad_hidden = torch.empty_like(student_hidden) if with_grad else student_hidden.new_empty(0)
    grad_weight = torch.zeros_like(student_weight) if with_grad else student_weight.new_empty(0)
    grad_bias = (
        torch.zeros_like(student_bias)
        if with_grad and student_bias is not None
        else student_weight.new_empty(0)
    )
    # "mean" divides by the counted rows of the whole batch, not of one chunk.
    if reduction == "mean" and num_items is None:
        counted = rows if labels is None else (labels != ignore_index).sum()
        num_items = torch.as_tensor(counted, dtype=torch.float64, device=student_hidden.device)
    losses = []
    for start in range(0, rows, chunk_size):
        stop = min(start + chunk_size, rows)
        student_logits = _linear(student_hidden[start:stop], student_weight, student_bias)
        teacher_logits = _linear(teacher_hidden[start:stop], teacher_weight, teacher_bias)
        loss, grad = torch.ops.sokd.logit_distill_loss(
            student_logits, teacher_logits, None, None,
            None if labels is None else labels[start:stop], divergence, beta, temperature,
            ignore_index, reduction, num_items, vocab_size, with_grad,
        )
        del teacher_logits, student_logits
        losses.append(loss)
        if not with_grad:
            continue
        if row_scale is not None:
            grad.mul_(row_scale[start:stop, None].to(grad.dtype))
        torch.mm(grad, student_weight, out=grad_hidden[start:stop])
        grad_weight.addmm_(grad.t(), student_hidden[start:stop])
        if student_bias is not None:
            grad_bias += grad.sum(0)
    total = torch.cat(losses) if reduction == "none" else torch.stack(losses).sum()
    return total, grad_hidden, grad_weight, grad_bias


@_fused_linear_op.register_fake
def _(
    student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
    labels, row_scale, divergence, beta, temperature, ignore_index, reduction, num_items,
    vocab_size, chunk_size, with_grad,
):
    dtype = accumulation_dtype(student_hidden.dtype)
    loss = student_hidden.new_empty(
        (student_hidden.shape[0],) if reduction == "none" else (), dtype=dtype
    )
    if not with_grad:
        empty = student_hidden.new_empty(0)
        return loss, empty, student_weight.new_empty(0), student_weight.new_empty(0)
    grad_bias = (
        torch.empty_like(student_bias) if student_bias is not None else student_weight.new_empty(0)
    )
    return loss, torch.empty_like(student_hidden), torch.empty_like(student_weight), grad_bias


_DIFFERENTIABLE = (0, 1, 4)  # student_hidden, student_weight, student_bias


def _setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias)
    ctx.set_materialize_grads(False)  # no zero-filled gradients of the saved gradients
    ctx.per_row = inputs[12] == "none"
    ctx.with_grad = inputs[16]
    if ctx.per_row:
        # Backward reruns the chunks: keep the inputs (tensors, then num_items) and options.
        ctx.save_for_backward(*inputs[:7], inputs[13])
        ctx.options = inputs[8:13]
        ctx.sizes = inputs[14:16]
    else:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)


def _backward(ctx, grad_loss, *_unused):
    needs = [ctx.needs_input_grad[i] for i in _DIFFERENTIABLE]
    result = [None] * 17
    if grad_loss is None or not any(needs):
        return tuple(result)
    if ctx.per_row:
        *tensors, num_items = ctx.saved_tensors
        with torch.no_grad():
            _, *grads = _fused_linear_op(
                *tensors, grad_loss, *ctx.options, num_items, *ctx.sizes, True
            )
        grads = [first_order_only(g) for g in grads]
    else:
        if not ctx.with_grad:
            raise RuntimeError(
                f"{_OP_NAME} ran with with_grad=False, so it saved no gradient; call it with "
                "with_grad=True when the student's tensors need gradients"
            )
        grads = [scale_saved_grad(g, grad_loss, False) for g in ctx.saved_tensors]
    for index, needed, grad in zip(_DIFFERENTIABLE, needs, grads):
        if needed:
            result[index] = grad
    return tuple(result)


_fused_linear_op.register_autograd(_backward, setup_context=_setup_context)


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

    if use_reference(device):
        return reference.logit_distill_loss(
            _linear(student_hidden.reshape(rows, -1), student_weight, student_bias),
            _linear(teacher_hidden.reshape(rows, -1), teacher_weight, teacher_bias),
            divergence=divergence, beta=beta, temperature=temperature, labels=label_rows,
            ignore_index=ignore_index, reduction=reduction, num_items=num_items_tensor,
            vocab_size=vocab,
        ).reshape(lead if reduction == "none" else ())
    student_tensors: Sequence[Tensor | None] = (student_hidden, student_weight, student_bias)
    with_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in student_tensors
    ) and reduction != "none"
    loss, _, _, _ = _fused_linear_op(
        student_hidden.reshape(rows, -1), student_weight,
        teacher_hidden.detach().reshape(rows, -1), teacher_weight.detach(), student_bias,
        None if teacher_bias is None else teacher_bias.detach(), label_rows, None,
        divergence, beta, temperature, int(ignore_index), reduction, num_items_tensor, vocab,
        chunk_size, with_grad,
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
