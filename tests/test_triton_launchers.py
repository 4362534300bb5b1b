"""Each Triton launcher against the C++ CPU op of the same sokd:: schema, on the same inputs.

The launchers are the implementations of the sokd:: ops on the Triton path, so they must return
what the CPU kernels return: the same outputs, shapes and dtypes, and for the losses the
gradient already normalised (an empty one when with_grad is false). Without a GPU they run
under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1); on a GPU machine they run
compiled on CUDA tensors, still compared with the CPU op.
"""

import inspect
import os

import pytest
import torch

import sokd  # noqa: F401  (loads the sokd:: ops)
from sokd import kernels
from sokd.augment_ops import (
    CHANNEL_DROP,
    CHANNEL_SHUFFLE,
    CUTOUT,
    NOISE,
    ROTATE,
    SHEAR_X,
    TRANSLATE_X,
    draw_randomness,
)
from sokd.reference.common import accumulation_dtype

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton launchers need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

# The interpreter evaluates masked-out lanes too (-inf - -inf there); the kernels discard them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    # bfloat16 has 8 bits of mantissa: one rounding of the gradient either way.
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-4},
}


def random_tensor(*shape, dtype=torch.float32, scale=1.0):
    generator = torch.Generator().manual_seed(hash(shape) % 2**31)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def transposed_map(n, c, h, w, dtype):
    """An N x C x H x W map whose H and W are swapped in memory: not contiguous."""
    return random_tensor(n, c, w, h, dtype=dtype).transpose(2, 3)


def assert_loss_and_grad(launched, expected, dtype, with_grad):
    loss, grad = launched
    expected_loss, expected_grad = expected
    assert loss.shape == expected_loss.shape == ()
    assert loss.dtype == expected_loss.dtype
    assert grad.shape == expected_grad.shape
    assert grad.dtype == expected_grad.dtype == accumulation_dtype(dtype)
    if with_grad:
        assert grad.is_contiguous()
    else:
        assert grad.numel() == 0
    loss_tolerance = TOLERANCES[torch.float32 if dtype == torch.bfloat16 else dtype]
    torch.testing.assert_close(loss.cpu(), expected_loss, **loss_tolerance)
    torch.testing.assert_close(grad.cpu(), expected_grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("normalize_by_mask", [False, True])
@pytest.mark.parametrize("with_grad", [True, False])
def test_masked_feature_loss(dtype, with_mask, normalize_by_mask, with_grad):
    student = random_tensor(2, 3, 5, 6, dtype=dtype)
    teacher = transposed_map(2, 3, 5, 6, dtype)
    mask = random_tensor(2, 5, 6).abs() if with_mask else None
    expected = torch.ops.sokd.masked_feature_loss(
        student, teacher, mask, normalize_by_mask, with_grad
    )
    launched = kernels.masked_feature_loss(
        *on_device(student, teacher, mask), normalize_by_mask, with_grad
    )
    assert_loss_and_grad(launched, expected, dtype, with_grad)


def test_masked_feature_loss_all_zero_mask_gives_zero_loss_and_gradient():
    student, teacher = random_tensor(2, 3, 4, 4), random_tensor(2, 3, 4, 4, scale=2.0)
    mask = torch.zeros(2, 4, 4)
    loss, grad = kernels.masked_feature_loss(*on_device(student, teacher, mask), True, True)
    assert loss.item() == 0
    assert torch.count_nonzero(grad).item() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 10), (2, 5, 3, 4)], ids=["logits", "dense"])
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("with_grad", [True, False])
def test_kd_loss(dtype, shape, with_weight, with_grad):
    student = random_tensor(*shape, dtype=dtype, scale=3.0)
    # The teacher is read through a transposed view: not contiguous.
    teacher = random_tensor(*reversed(shape[:2]), *shape[2:], dtype=dtype).transpose(0, 1)
    row_shape = (shape[0], *shape[2:])
    weight = random_tensor(*row_shape).abs() if with_weight else None
    expected = torch.ops.sokd.kd_loss(student, teacher, 2.5, weight, with_grad)
    launched = kernels.kd_loss(*on_device(student, teacher), 2.5, *on_device(weight), with_grad)
    assert_loss_and_grad(launched, expected, dtype, with_grad)


def test_kd_loss_long_rows_take_the_chunked_path():
    # More classes than one tile holds: the kernel walks the row in chunks.
    student, teacher = random_tensor(3, 5000), random_tensor(3, 5000, scale=2.0)
    expected = torch.ops.sokd.kd_loss(student, teacher, 4.0, None, True)
    launched = kernels.kd_loss(*on_device(student, teacher), 4.0, None, True)
    assert_loss_and_grad(launched, expected, torch.float32, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 10), (2, 5, 3, 4)], ids=["logits", "dense"])
@pytest.mark.parametrize("with_grad", [True, False])
def test_decoupled_kd_loss(dtype, shape, with_grad):
    student = random_tensor(*shape, dtype=dtype, scale=3.0)
    teacher = random_tensor(*reversed(shape[:2]), *shape[2:], dtype=dtype).transpose(0, 1)
    class_mask = random_tensor(*shape) > 0.5
    expected = torch.ops.sokd.decoupled_kd_loss(
        student, teacher, class_mask, 1.0, 8.0, 4.0, with_grad
    )
    launched = kernels.decoupled_kd_loss(
        *on_device(student, teacher, class_mask), 1.0, 8.0, 4.0, with_grad
    )
    assert_loss_and_grad(launched, expected, dtype, with_grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_interest_map(dtype):
    heat = transposed_map(2, 3, 12, 10, dtype).sigmoid()
    wh = random_tensor(2, 2, 12, 10).abs().mul(4).to(dtype)
    offset = random_tensor(2, 2, 10, 12).sigmoid().transpose(2, 3).to(dtype)
    expected = torch.ops.sokd.interest_map(heat, wh, offset, 5, 3)
    launched = kernels.interest_map(*on_device(heat, wh, offset), 5, 3)
    for got, want in zip(launched, expected, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "op_ids",
    [
        [SHEAR_X, ROTATE],
        [CUTOUT, CHANNEL_SHUFFLE, TRANSLATE_X],
        [CHANNEL_DROP, ROTATE, CUTOUT, SHEAR_X],
    ],
    ids=["affine-pair", "three-ops", "four-ops"],
)
def test_feature_augment(dtype, op_ids):
    x = transposed_map(2, 4, 7, 9, dtype)
    values = torch.tensor([0.3, -0.4, 0.2, 0.25])[: len(op_ids)]
    draws = draw_randomness(op_ids, x.shape, "cpu", torch.Generator().manual_seed(3))
    seeds = [0] * len(op_ids)
    expected = torch.ops.sokd.feature_augment(x, op_ids, values, draws, seeds)
    launched = kernels.feature_augment(x.to(DEVICE), op_ids, values.to(DEVICE),
                                       on_device(*draws), seeds)
    assert launched.dtype == expected.dtype == dtype
    assert launched.shape == expected.shape and launched.is_contiguous()
    # Longer sequences keep the intermediate map in the accumulation type on both sides, but
    # bilinear taps of a bilinear map add in another order: a few roundings in bfloat16.
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else TOLERANCES[dtype]
    torch.testing.assert_close(launched.cpu(), expected, **tolerance)


def test_feature_augment_noise_follows_its_seed():
    x = random_tensor(2, 3, 6, 6).to(DEVICE)
    values = torch.tensor([0.5], device=DEVICE)

    def noisy(seed):
        return kernels.feature_augment(x, [NOISE], values, [None], [seed])

    assert torch.equal(noisy(11), noisy(11))
    assert not torch.equal(noisy(11), noisy(12))
    noise = (noisy(11) - x) / 0.5
    assert abs(noise.mean().item()) < 0.3 and 0.7 < noise.std().item() < 1.3


@pytest.mark.parametrize("name", sorted(kernels.LAUNCHERS))
def test_each_launcher_takes_the_arguments_of_its_sokd_op(name):
    schema = getattr(torch.ops.sokd, name).default._schema
    launcher = kernels.LAUNCHERS[name]
    assert launcher.__name__ == name
    assert list(inspect.signature(launcher).parameters) == [a.name for a in schema.arguments]
