"""The backends the hardening tests run, the devices they run them on, and how results compare.

Every test that imports this module is generic over backends: a backend that becomes available
(sokd._C built, the Triton kernels complete) is covered without touching the tests.
"""

import contextlib
from typing import NamedTuple

import torch
from hypothesis import HealthCheck, settings

import sokd
from sokd import _backend


class Target(NamedTuple):
    """One backend running on one device."""

    backend: str
    device: torch.device

    @property
    def interpreted(self):
        """Triton kernels on CPU tensors run in the (slow, numpy-based) Triton interpreter."""
        return self.backend == "triton" and self.device.type == "cpu"

    @property
    def id(self):
        if self.interpreted:
            return "triton-interpreter"
        if self.backend == "reference" and self.device.type != "cpu":
            return f"reference-{self.device.type}"
        return self.backend


def _devices():
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def _targets():
    # Under "auto" the reference may be the only backend; naming each one keeps the matrix
    # honest about which implementation a result came from.
    return [
        Target(name, device)
        for name in sokd.available_backends()
        for device in _devices()
        if _backend._runs_on(name, device)
    ]


ALL_TARGETS = _targets()
KERNEL_TARGETS = [target for target in ALL_TARGETS if target.backend != "reference"]
REFERENCE_TARGETS = [target for target in ALL_TARGETS if target.backend == "reference"]


def target_params(targets):
    return {"argvalues": targets, "ids": [target.id for target in targets]}


@contextlib.contextmanager
def using(backend):
    """Run the enclosed ops on `backend`; the conftest fixture restores the choice per test."""
    previous = sokd.get_backend()
    sokd.set_backend(backend)
    try:
        yield
    finally:
        sokd.set_backend(previous)


def example_budget(target, compiled_examples):
    """Interpreted Triton is orders of magnitude slower than compiled code: a few tiny examples
    there, the full budget everywhere else."""
    return max(2, compiled_examples // 3) if target.interpreted else compiled_examples


def fixed_profile(max_examples):
    """A reproducible hypothesis profile: the same examples on every run, no time deadline
    (first calls compile kernels), no example database written into the tree."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Relative tolerance per value dtype. Half types are one rounding of an fp32 result apart, so
# they get about two units in the last place; fp32 allows for a different summation order.
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def assert_matches(actual, expected, what, natural_scale=0.0):
    """`actual` equals `expected` up to the tolerance of expected's dtype, with the absolute part
    scaled by expected's largest finite magnitude (or by `natural_scale`, the size the value
    would have without cancellation, when that is larger), and NaN exactly where expected has
    NaN."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    tolerance = TOLERANCE.get(expected.dtype)
    if tolerance is None:
        assert torch.equal(actual.cpu(), expected.cpu()), f"{what}: {actual} != {expected}"
        return
    actual, expected = actual.detach(), expected.detach()
    finite = expected[torch.isfinite(expected)]
    scale = max(float(finite.abs().max()) if finite.numel() else 1.0, natural_scale)
    torch.testing.assert_close(
        actual,
        expected,
        rtol=tolerance,
        atol=tolerance * max(scale, torch.finfo(expected.dtype).tiny),
        equal_nan=True,
        msg=lambda message: f"{what}: {message}",
    )


def arrange(values, layout):
    """The same values (or, for "broadcast", values repeated along dim 0) in another memory
    layout: kernels must read strides, not assume contiguity."""
    if layout == "contiguous":
        return values.contiguous()
    if layout == "transposed":
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.zeros(
            *values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype, device=values.device
        )
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "broadcast":
        return values[:1].expand_as(values)
    raise ValueError(f"unknown layout {layout!r}")


LAYOUTS_2D = ("contiguous", "transposed", "strided", "broadcast")
LAYOUTS_4D = LAYOUTS_2D + ("channels_last",)


def leaf(values, requires_grad):
    """A leaf tensor with values' strides (detach keeps them), optionally requiring grad."""
    return values.detach().requires_grad_(requires_grad)
