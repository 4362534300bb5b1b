"""The sokd:: ops behind the backend contract of sokd/_backend.py, for the cpu, cuda and triton
backends alike; importing it raises ImportError when the extension sokd._C was not built.

Each op has one schema (csrc/<op>.cpp) and one autograd (csrc/autograd.cpp, C++ for every
device): the loss ops return (loss, grad_student), their kernels compute the input gradient in
the same pass as the loss, and backward only scales that saved gradient by grad_output. Below
the autograd, the device kernel is either the C++ one (csrc/cpu, csrc/cuda) or the Triton
launcher of the same name (kernels/<op>.py). At the CUDA key a router picks one per call from
the backend selection (sokd._backend.runs_triton). The CPU key keeps the C++ kernel alone, with
no Python per call, except under TRITON_INTERPRET=1, where the interpreter runs Triton on CPU
tensors and the router sits at the CPU key too. The fake (meta) kernels registered here let
torch.compile trace every op without a graph break.
"""

import os

import torch

from . import _C  # loading the library registers torch.ops.sokd.*
from ._backend import OPS, runs_triton
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


# Holds the routers' registrations for the life of the process.
_routers = torch.library.Library("sokd", "IMPL")


def _register_router(op, device_type):
    """Makes the `device_type` kernel of sokd::<op> a router between the Triton launcher and
    the C++ kernel registered there (None when the extension lacks that device)."""
    key = device_type.upper()
    native_kernel = (
        torch.library.get_kernel(f"sokd::{op}", key) if device_type in supported_devices() else None
    )

    def route(keyset, *args):
        if runs_triton(op, args[0].device):
            from . import kernels

            return kernels.LAUNCHERS[op](*args)
        if native_kernel is None:
            raise RuntimeError(
                f"sokd._C was built without {device_type} kernels, so sokd::{op} runs on "
                f"{device_type} tensors only with the triton backend (sokd.set_backend)"
            )
        return native_kernel.call_boxed(keyset, *args)

    _routers.impl(op, route, key, with_keyset=True)


for _op in OPS:
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
