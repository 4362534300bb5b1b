"""Autograd of the fused losses on every kernel backend: their kernels save the first
derivative only, so a gradient taken with create_graph=True still matches the reference, and
differentiating it again raises instead of silently dropping the second-order terms."""

import pytest
import torch
from backend_matrix import KERNEL_TARGETS, target_params, using

from sokd import ops

pytestmark = pytest.mark.parametrize("target", **target_params(KERNEL_TARGETS))

SECOND_DERIVATIVE_REFUSED = "differentiable once|once_differentiable"


def _inputs(device):
    generator = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    feature_target = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    logits = torch.randn(6, 7, generator=generator, dtype=torch.float64) * 3
    teacher_logits = torch.randn(6, 7, generator=generator, dtype=torch.float64) * 3
    moved = (t.to(device) for t in (feature, feature_target, logits, teacher_logits))
    return tuple(moved)


LOSSES = {
    "masked_feature_loss": lambda feature, target, logits, teacher: ops.masked_feature_loss(
        feature, target
    ),
    "kd_loss": lambda feature, target, logits, teacher: ops.kd_loss(logits, teacher),
    "decoupled_kd_loss": lambda feature, target, logits, teacher: ops.decoupled_kd_loss(
        logits, teacher, teacher > 0
    ),
}


def _differentiated_input(name, inputs):
    return inputs[0] if name == "masked_feature_loss" else inputs[2]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_create_graph_gives_the_first_derivative_and_refuses_a_second(target, name):
    inputs = _inputs(target.device)
    wanted = _differentiated_input(name, inputs)

    with using("reference"):
        leaf = wanted.clone().requires_grad_(True)
        args = [leaf if x is wanted else x for x in inputs]
        (expected,) = torch.autograd.grad(LOSSES[name](*args), leaf)

    with using(target.backend):
        leaf = wanted.clone().requires_grad_(True)
        args = [leaf if x is wanted else x for x in inputs]
        (first,) = torch.autograd.grad(LOSSES[name](*args), leaf, create_graph=True)
    torch.testing.assert_close(first.detach(), expected, rtol=1e-9, atol=1e-12)
    assert first.requires_grad
    with pytest.raises(RuntimeError, match=SECOND_DERIVATIVE_REFUSED):
        first.pow(2).sum().backward()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_grad_output_scales_the_gradient_on_every_path(target, name):
    inputs = _inputs(target.device)
    wanted = _differentiated_input(name, inputs)
    with using(target.backend):
        leaf = wanted.clone().requires_grad_(True)
        args = [leaf if x is wanted else x for x in inputs]
        loss = LOSSES[name](*args)
        seed = torch.tensor(-0.75, dtype=loss.dtype, device=loss.device)
        (scaled,) = torch.autograd.grad(loss, leaf, seed, retain_graph=True)
        (unit,) = torch.autograd.grad(loss, leaf, retain_graph=True)
        (created,) = torch.autograd.grad(loss, leaf, seed, create_graph=True)
    torch.testing.assert_close(scaled, -0.75 * unit, rtol=1e-12, atol=0)
    torch.testing.assert_close(created.detach(), scaled, rtol=0, atol=0)
