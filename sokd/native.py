"""The sokd:: ops behind the backend contract of sokd/_backend.py, for the cpu, cuda and triton
backends alike; importing it raises ImportError when the extension sokd._C was not built.

Each op has one schema (csrc/<op>.cpp) and one autograd (csrc/autograd.cpp, C++ for every
device): the loss ops return (loss, grad_student), their kernels compute the input gradient in
the same pass as the loss, and backward only scales that saved gradient by grad_output. Below
the autograd, the device kernel is either the C++ one (csrc/cpu, csrc/cuda) or the Triton
launcher of the same name (kernels/<op>.py). At the CUDA key a router picks one per call from
the backend selection (sokd._backend.runs_triton). The CPU key keeps the C++ kernel alone, with
no Python per call, except under TRITON_INTERPRET=1, where the interpreter runs Triton on CPU
tensors and the router sits at the CPU key too. A composite op (fused_linear_distill_loss) has
one C++ kernel for every device (csrc/composite/), made of other sokd:: ops, whose routers
choose. The fake (meta) kernels registered here let torch.compile trace every op without a
graph break.
"""

import os

import torch

from . import _C  # loading the library registers torch.ops.sokd.*
from ._backend import COMPOSITE_OPS, OPS, runs_triton
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
    """The loss and the gradient are both in the accumulation dtype (float32 for 16-bit
    inputs); the autograd rounds the gradient to the input's dtype once, after scaling it."""
    dtype = accumulation_dtype(student.dtype)
    loss = student.new_empty((), dtype=dtype)
    grad = student.new_empty(student.shape if with_grad else (0,), dtype=dtype)
    return loss, grad


# The ops with a kernel per device (a Triton launcher and C++ kernels), between which a router
# chooses. The composite ops run other sokd:: ops, whose routers choose.
KERNEL_OPS = tuple(op for op in OPS if op not in COMPOSITE_OPS)

# Holds the routers' registrations for the life of the process.
_routers = torch.library.Library("sokd", "IMPL")


def _register_router(op, device_type):
    """Makes the `device_type` kernel of sokd::<op> a router between the Triton launcher and
    the C++ kernel registered there (None when the extension has none: a build without CUDA,
    or an op whose only GPU kernel is Triton's)."""
    key = device_type.upper()
    name = f"sokd::{op}"
    native_kernel = (
        torch.library.get_kernel(name, key)
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, key) else None
    )

    def route(keyset, *args):
        if runs_triton(op, args[0].device):
            from . import kernels

            return kernels.LAUNCHERS[op](*args)
        if native_kernel is None:
            raise RuntimeError(
                f"sokd._C has no C++ {device_type} kernel of sokd::{op} (the extension was "
                f"built without {device_type} kernels, or the op has none), so it runs on "
                f"{device_type} tensors only with the triton backend (sokd.set_backend)"
            )
        return native_kernel.call_boxed(keyset, *args)

    _routers.impl(op, route, key, with_keyset=True)


for _op in KERNEL_OPS:
    _register_router(_op, "cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _register_router(_op, "cpu")


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


@torch.library.register_fake("sokd::logit_distill_loss")
def _logit_distill_loss_fake(
    student_logits, teacher_logits, teacher_logprobs, teacher_indices, labels, divergence,
    beta, temperature, ignore_index, reduction, num_items, vocab_size, with_grad,
):
    """The N x V gradient keeps the logits' dtype (csrc/logit_distill_loss.cpp)."""
    rows = (student_logits.shape[0],) if reduction == "none" else ()
    loss = student_logits.new_empty(rows, dtype=accumulation_dtype(student_logits.dtype))
    grad = student_logits.new_empty(student_logits.shape if with_grad else (0,))
    return loss, grad


@torch.library.register_fake("sokd::fused_linear_distill_loss")
def _fused_linear_distill_loss_fake(
    student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
    labels, row_scale, divergence, beta, temperature, ignore_index, reduction, num_items,
    vocab_size, chunk_size, with_grad,
):
    rows = (student_hidden.shape[0],) if reduction == "none" else ()
    loss = student_hidden.new_empty(rows, dtype=accumulation_dtype(student_hidden.dtype))
    if not with_grad:
        return loss, *(student_hidden.new_empty(0) for _ in range(3))
    grad_bias = (
        student_hidden.new_empty(0) if student_bias is None else torch.empty_like(student_bias)
    )
    return loss, torch.empty_like(student_hidden), torch.empty_like(student_weight), grad_bias


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


def logit_distill_loss(
    student_logits, teacher_logits=None, *, divergence, beta, temperature, labels, ignore_index,
    reduction, num_items, vocab_size, teacher_topk,
):
    logprobs, indices = (None, None) if teacher_topk is None else teacher_topk
    loss, _ = _ops.logit_distill_loss(
        student_logits, None if teacher_logits is None else teacher_logits.detach(), logprobs,
        indices, labels, divergence, beta, temperature, ignore_index, reduction, num_items,
        vocab_size, _needs_grad(student_logits),
    )
    return loss


def fused_linear_distill_loss(
    student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
    *, chunk_size, divergence, beta, temperature, labels, ignore_index, reduction, num_items,
    vocab_size,
):
    # "none" keeps no gradient: its backward reruns the chunks with each row's grad_output.
    student = [t for t in (student_hidden, student_weight, student_bias) if t is not None]
    with_grad = reduction != "none" and _needs_grad(*student)
    loss, _, _, _ = _ops.fused_linear_distill_loss(
        student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(),
        student_bias, None if teacher_bias is None else teacher_bias.detach(), labels, None,
        divergence, beta, temperature, ignore_index, reduction, num_items, vocab_size,
        chunk_size, with_grad,
    )
    return loss


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
            "torch.jit.trace cannot record sokd::feature_augment: TorchScript has no "
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
