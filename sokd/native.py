"""The native backend: the sokd._C kernels (C++ on the CPU, CUDA on the GPU) behind the
backend contract of sokd/_backend.py. The registry loads this module for both "cpu" and
"cuda"; importing it raises ImportError when the extension was not built.

The C++ loss ops return (loss, grad_student): their kernels compute the input gradient in the
same pass as the loss, and their autograd (csrc/autograd.cpp) only scales that saved gradient
by grad_output. The fake (meta) kernels registered here let torch.compile trace every op
without a graph break.
"""

import torch

from . import _C  # loading the library registers torch.ops.sokd.*
from .augment_ops import AFFINE_OPS
from .reference.common import accumulation_dtype

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


def _fake_loss_outputs(student, with_grad):
    loss = student.new_empty((), dtype=accumulation_dtype(student.dtype))
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


def _needs_grad(*tensors):
    """Whether the kernel must compute the input gradient. A torch.jit.trace graph replays
    the op with the value seen while tracing, whatever its later inputs need, so a traced
    call always computes it."""
    if torch.jit.is_tracing():
        return True
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
    if torch.jit.is_tracing():
        raise RuntimeError(
            "torch.jit.trace cannot record the native feature_augment: TorchScript has no "
            "type for its list of optional draw tensors. Use torch.compile or torch.export, "
            "or trace with sokd.set_backend('reference')"
        )
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
