"""sokd.logit_distill_loss: logit distillation for language models (docs/algorithm.md §7).

The op `sokd::logit_distill_loss` has its schema in csrc/logit_distill_loss.cpp and its CPU
kernel in csrc/cpu/logit_distill_loss_kernel.cpp. This module adds, for every device, its fake
(for torch.compile), its one autograd (backward scales the gradient the kernel saved in the
forward pass) and its CUDA impl (the Triton kernel in kernels/logit_distill_loss.py), then the
typed public function that validates and chooses between the op and the pure-PyTorch reference.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from torch import Tensor

import sokd.reference.logit_distill_loss as reference

from .. import _validation as check
from .._backend import _fallback_to_reference, get_backend
from ..reference.common import accumulation_dtype

try:
    from .. import _C
except ImportError:  # built without the extension: only the reference runs
    _C = None

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Reduction = Literal["mean", "sum", "none"]
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
# Top-k log-probabilities above 0 by more than this are an error, not rounding.
LOGPROB_TOLERANCE = 1e-4

_OP_NAME = "sokd::logit_distill_loss"


class _FirstOrderOnly(torch.autograd.Function):
    """Identity forward; a backward through it raises. The kernel saves only the first
    derivative, so a gradient taken with create_graph=True must not be differentiated again."""

    @staticmethod
    def forward(ctx, gradient: Tensor) -> Tensor:
        return gradient.view_as(gradient)

    @staticmethod
    def backward(ctx, _: Tensor) -> Tensor:
        raise RuntimeError(
            f"{_OP_NAME} is differentiable once: its fused kernel saves the first derivative "
            "only. Use the reference backend for higher-order gradients."
        )


def _is_plain_one(grad_loss: Tensor) -> bool:
    """Whether grad_loss is a CPU value of exactly 1 that may be read (not a traced tensor)."""
    return (
        not torch.compiler.is_compiling()
        and type(grad_loss) is Tensor
        and grad_loss.device.type == "cpu"
        and grad_loss.numel() == 1
        and not torch._C._functorch.is_functorch_wrapped_tensor(grad_loss)
        and grad_loss.item() == 1.0
    )


def scale_saved_grad(grad: Tensor, grad_loss: Tensor, per_row: bool) -> Tensor:
    """The saved gradient times grad_output: per row for reduction "none", else a scalar. A
    loss.backward() seed of 1 returns the saved gradient itself (no pass over it)."""
    if per_row:
        scaled = grad * grad_loss.unsqueeze(-1).to(grad.dtype)
    elif _is_plain_one(grad_loss):
        scaled = grad
    else:
        scaled = grad * grad_loss.to(grad.dtype)
    return first_order_only(scaled)


def first_order_only(grad: Tensor) -> Tensor:
    """Under create_graph=True, the gradient comes back through a node that raises on a second
    backward, instead of silently missing every second-order term."""
    if torch.is_grad_enabled():
        return _FirstOrderOnly.apply(grad.detach().requires_grad_(True))
    return grad


if _C is not None:

    @torch.library.register_fake(_OP_NAME)
    def _fake(
        student_logits, teacher_logits, teacher_logprobs, teacher_indices, labels, divergence,
        beta, temperature, ignore_index, reduction, num_items, vocab_size, with_grad,
    ):
        dtype = accumulation_dtype(student_logits.dtype)
        rows = (student_logits.shape[0],) if reduction == "none" else ()
        loss = student_logits.new_empty(rows, dtype=dtype)
        grad = student_logits.new_empty(student_logits.shape if with_grad else (0,))
        return loss, grad

    def _setup_context(ctx, inputs, output):
        _, grad = output
        ctx.mark_non_differentiable(grad)
        # Otherwise autograd hands backward a zero-filled N x V "gradient" of `grad`.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad)
        ctx.per_row = inputs[9] == "none"
        ctx.with_grad = inputs[12]

    def _backward(ctx, grad_loss, _grad_grad):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * 13
        if not ctx.with_grad:
            raise RuntimeError(
                f"{_OP_NAME} ran with with_grad=False, so it saved no gradient; call it with "
                "with_grad=True when student_logits needs a gradient"
            )
        (grad,) = ctx.saved_tensors
        return (scale_saved_grad(grad, grad_loss, ctx.per_row),) + (None,) * 12

    torch.library.register_autograd(_OP_NAME, _backward, setup_context=_setup_context)

    @torch.library.register_kernel(_OP_NAME, "cuda")
    def _cuda(
        student_logits, teacher_logits, teacher_logprobs, teacher_indices, labels, divergence,
        beta, temperature, ignore_index, reduction, num_items, vocab_size, with_grad,
    ):
        from ..kernels.logit_distill_loss import logit_distill_loss as launch

        return launch(
            student_logits, teacher_logits, teacher_logprobs, teacher_indices, labels,
            divergence=divergence, beta=beta, temperature=temperature,
            ignore_index=ignore_index, reduction=reduction, num_items=num_items,
            vocab_size=vocab_size, with_grad=with_grad,
        )


def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton could not be imported ({error})"
    return None


def use_reference(device: torch.device) -> bool:
    """Whether the selected backend (sokd.set_backend) runs the reference for tensors on
    `device`; raises when a named backend cannot run there."""
    name = get_backend()
    if name == "reference":
        return True
    missing_c = None if _C is not None else "sokd._C was not built"
    if name == "auto":
        reason = missing_c
        if reason is None and device.type == "cuda":
            reason = _triton_missing()
        elif device.type not in ("cpu", "cuda"):
            reason = f"no kernel for {device.type} tensors"
        if reason is not None:
            _fallback_to_reference(device, reason)
            return True
        return False
    wanted = {"cpu": "cpu", "triton": "cuda"}.get(name)
    if wanted is None:
        raise ValueError(
            f"backend {name!r} has no logit_distill_loss kernel: CUDA tensors run the Triton "
            "kernel; choose 'triton' or 'auto' with sokd.set_backend"
        )
    if device.type != wanted:
        hint = (
            " (under TRITON_INTERPRET=1 call sokd.kernels.logit_distill_loss.logit_distill_loss "
            "directly)" if name == "triton" else ""
        )
        raise ValueError(
            f"backend {name!r} runs logit_distill_loss on {wanted} tensors, got {device.type} "
            f"tensors{hint}; move the tensors or choose another backend with sokd.set_backend"
        )
    reason = missing_c or (_triton_missing() if name == "triton" else None)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return False


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

    if use_reference(device):
        return reference.logit_distill_loss(
            student_logits, teacher_logits, divergence=divergence, beta=beta,
            temperature=temperature, labels=labels, ignore_index=ignore_index,
            reduction=reduction, num_items=num_items_tensor, vocab_size=vocab,
            teacher_topk=teacher_topk,
        )
    with_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, _ = torch.ops.sokd.logit_distill_loss(
        student_logits.reshape(rows, student_vocab),
        None if teacher_logits is None else teacher_logits.detach().reshape(rows, teacher_vocab),
        None if topk is None else topk[0],
        None if topk is None else topk[1],
        label_rows,
        divergence,
        beta,
        temperature,
        int(ignore_index),
        reduction,
        num_items_tensor,
        vocab,
        with_grad,
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
