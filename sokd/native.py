"""The native backend: the sokd._C kernels (C++ on the CPU, CUDA on the GPU) behind the
backend contract of sokd/_backend.py. The registry loads this module for both "cpu" and
"cuda"; importing it raises ImportError when the extension was not built.

The C++ loss ops return (loss, grad_student): their kernels compute the input gradient in the
same pass as the loss. Their autograd, registered here, only scales that saved gradient by
grad_output. Fake (meta) kernels let torch.compile trace every op without a graph break.
"""

import torch

from . import _C  # loading the library registers torch.ops.sokd.*
from .augment_ops import AFFINE_OPS

# The fused augmentation kernel takes at most this many ops, with at most this many affine
# ops among them (each affine op multiplies the bilinear reads by 4); longer sequences run
# as several passes.
MAX_OPS_PER_PASS = 8
MAX_AFFINE_PER_PASS = 2

_ops = torch.ops.sokd


def supported_devices():
    """("cpu", "cuda") when the extension was compiled with its CUDA kernels, else ("cpu",)."""
    return ("cpu", "cuda") if _C.WITH_CUDA else ("cpu",)


def release_cached_outputs():
    """Free the large CPU output blocks kept for reuse; returns the bytes freed."""
    return _ops.release_cached_outputs()


def _loss_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_loss_outputs(student, with_grad):
    loss = student.new_empty((), dtype=_loss_dtype(student.dtype))
    grad = student.new_empty(student.shape) if with_grad else student.new_empty((0,))
    return loss, grad


@torch.library.register_fake("sokd::masked_feature_loss")
def _masked_feature_loss_fake(student, teacher, mask, normalize_by_mask, with_grad):
    return _fake_loss_outputs(student, with_grad)


@torch.library.register_fake("sokd::kd_loss")
def _kd_loss_fake(student_logits, teacher_logits, temperature, weight, with_grad):
    return _fake_loss_outputs(student_logits, with_grad)


@torch.library.register_fake("sokd::decoupled_kd_loss")
def _decoupled_kd_loss_fake(
    student_logits, teacher_logits, class_mask, alpha, beta, temperature, with_grad
):
    return _fake_loss_outputs(student_logits, with_grad)


@torch.library.register_fake("sokd::interest_map")
def _interest_map_fake(heat, wh, offset, k, kernel):
    n, _, height, width = heat.shape
    count = heat.new_empty((n, height, width), dtype=torch.float32)
    boxes = heat.new_empty((n, k, 4), dtype=torch.int64)
    scores = heat.new_empty((n, k))
    return count, boxes, scores


@torch.library.register_fake("sokd::feature_augment")
def _feature_augment_fake(x, op_ids, values, draws, noise_seeds):
    return x.new_empty(x.shape)


def _save_fused_grad(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    # The returned gradient is an output of the op but has no derivative of its own; without
    # this, autograd would build a zero tensor of its size for every backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _scaled_grad(ctx, grad_loss):
    if grad_loss is None:  # the loss took no part in what is being differentiated
        return None
    (grad,) = ctx.saved_tensors
    handover = (
        grad.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch.is_grad_enabled()  # create_graph=True needs the product's graph
        and grad_loss.item() == 1
    )
    if handover:
        # loss.backward() seeds 1, so the saved gradient is the answer, and handing it over
        # spares a full read and write (and, on the CPU, the page faults of a fresh tensor).
        return grad
    return grad * grad_loss.to(grad.dtype)


def _masked_feature_loss_backward(ctx, grad_loss, _):
    grad_student = _scaled_grad(ctx, grad_loss)
    grad_teacher = None
    if grad_student is not None and ctx.needs_input_grad[1]:
        grad_teacher = -grad_student
    return grad_student, grad_teacher, None, None, None


def _kd_loss_backward(ctx, grad_loss, _):
    return _scaled_grad(ctx, grad_loss), None, None, None, None


def _decoupled_kd_loss_backward(ctx, grad_loss, _):
    return _scaled_grad(ctx, grad_loss), None, None, None, None, None, None


torch.library.register_autograd(
    "sokd::masked_feature_loss", _masked_feature_loss_backward, setup_context=_save_fused_grad
)
torch.library.register_autograd(
    "sokd::kd_loss", _kd_loss_backward, setup_context=_save_fused_grad
)
torch.library.register_autograd(
    "sokd::decoupled_kd_loss", _decoupled_kd_loss_backward, setup_context=_save_fused_grad
)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def masked_feature_loss(student, teacher, mask, normalize):
    with_grad = _needs_grad(student, teacher)
    loss, _ = _ops.masked_feature_loss(student, teacher, mask, normalize == "mask", with_grad)
    return loss


def kd_loss(student, teacher, temperature, weight):
    loss, _ = _ops.kd_loss(student, teacher, temperature, weight, _needs_grad(student))
    return loss


def decoupled_kd_loss(student, teacher, class_mask, alpha, beta, temperature):
    loss, _ = _ops.decoupled_kd_loss(
        student, teacher, class_mask, alpha, beta, temperature, _needs_grad(student)
    )
    return loss


def interest_map(heat, wh, offset, k, kernel):
    return tuple(_ops.interest_map(heat, wh, offset, k, kernel))


def _passes(op_ids):
    """(start, stop) slices of op_ids that each fit one fused kernel launch."""
    start, affine = 0, 0
    for index, op in enumerate(op_ids):
        is_affine = op in AFFINE_OPS
        if index - start == MAX_OPS_PER_PASS or (is_affine and affine == MAX_AFFINE_PER_PASS):
            yield start, index
            start, affine = index, 0
        affine += is_affine
    yield start, len(op_ids)


def feature_augment(x, op_ids, values, draws):
    out = x
    for start, stop in _passes(op_ids):
        chunk = draws[start:stop]
        out = _ops.feature_augment(
            out,
            list(op_ids[start:stop]),
            values[start:stop],
            [draw if isinstance(draw, torch.Tensor) else None for draw in chunk],
            [draw if isinstance(draw, int) else 0 for draw in chunk],
        )
    return out
