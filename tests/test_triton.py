"""The Triton backend against the reference, run through the Triton interpreter on the CPU.

conftest.py sets TRITON_INTERPRET=1 when there is no GPU; on a GPU machine the same tests run
the compiled kernels on CUDA tensors.
"""

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import sokd
from sokd import native, ops, reference
from sokd.augment_ops import (
    CHANNEL_DROP,
    CHANNEL_SHUFFLE,
    CUTOUT,
    NOISE,
    NUM_PRIMITIVES,
    PRIMITIVES,
    ROTATE,
    SHEAR_X,
    TRANSLATE_X,
    affine_matrix,
    draw_randomness,
    op_values,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

# The interpreter evaluates masked-out lanes too (-inf - -inf there); the kernels discard them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

HALF = torch.float16
DTYPES = (torch.float32, HALF)
DEFAULT_PAIRS = list(itertools.combinations(range(NUM_PRIMITIVES), 2))


def tolerances(dtype):
    if dtype == HALF:
        return {"rtol": 2e-3, "atol": 2e-3}
    return {"rtol": 1e-5, "atol": 1e-6}


def run(backend, op, *args, **kwargs):
    sokd.set_backend(backend)
    return op(*args, **kwargs)


def loss_and_grads(backend, op, inputs, *args, **kwargs):
    """The loss on `backend` and its gradients with respect to `inputs`."""
    leaves = [value.detach().clone().requires_grad_() for value in inputs]
    loss = run(backend, op, *leaves, *args, **kwargs)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def assert_loss_parity(op, inputs, *args, dtype, rtol=None, atol=None):
    loss, grads = loss_and_grads("triton", op, inputs, *args)
    expected_loss, expected_grads = loss_and_grads("reference", op, inputs, *args)
    tolerance = tolerances(dtype) if rtol is None else {"rtol": rtol, "atol": atol}
    assert loss.dtype == expected_loss.dtype
    torch.testing.assert_close(loss, expected_loss, **tolerance)
    for grad, expected in zip(grads, expected_grads):
        assert grad.shape == expected.shape and grad.dtype == expected.dtype
        torch.testing.assert_close(grad, expected, **tolerance)


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


# masked_feature_loss ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (3, 17, 4, 4)])
@pytest.mark.parametrize("normalize", ["elements", "mask"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_masked_feature_loss_matches_reference(dtype, shape, normalize, with_mask):
    torch.manual_seed(0)
    n, _, h, w = shape
    mask = torch.rand(n, h, w, device=DEVICE).to(dtype) * 3 if with_mask else None
    student, teacher = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    assert_loss_parity(ops.masked_feature_loss, (student, teacher), mask, normalize, dtype=dtype)


def test_masked_feature_loss_all_zero_mask_gives_zero_loss_and_gradient():
    student, teacher = randn(2, 3, 4, 5), randn(2, 3, 4, 5)
    mask = torch.zeros(2, 4, 5, device=DEVICE)
    loss, (grad_student, grad_teacher) = loss_and_grads(
        "triton", ops.masked_feature_loss, (student, teacher), mask, "mask"
    )
    assert loss.item() == 0
    assert not grad_student.any() and not grad_teacher.any()


def test_masked_feature_loss_non_contiguous_inputs():
    torch.manual_seed(1)
    student = randn(2, 5, 6, 3).contiguous(memory_format=torch.channels_last)
    teacher = randn(2, 5, 3, 6).transpose(2, 3)
    mask = torch.rand(2, 3, 6, device=DEVICE).transpose(1, 2)
    assert_loss_parity(
        ops.masked_feature_loss, (student, teacher), mask, "mask", dtype=torch.float32
    )


def test_masked_feature_loss_many_channels_split_over_programs():
    torch.manual_seed(2)
    student, teacher = randn(1, 300, 2, 3), randn(1, 300, 2, 3)
    mask = torch.rand(1, 2, 3, device=DEVICE)
    assert_loss_parity(
        ops.masked_feature_loss, (student, teacher), mask, "mask", dtype=torch.float32
    )


@pytest.mark.parametrize("name", ["masked_feature_loss", "kd_loss", "decoupled_kd_loss"])
def test_losses_without_grad_skip_the_gradient_and_match(name):
    # Under no_grad the kernels write no gradient; the loss must not change.
    torch.manual_seed(17)
    student, teacher = randn(2, 3, 4, 5), randn(2, 3, 4, 5)
    args = {
        "masked_feature_loss": (),
        "kd_loss": (2.0,),
        "decoupled_kd_loss": (teacher > 0, 1.0, 8.0, 2.0),
    }[name]
    op = getattr(ops, name)
    with torch.no_grad():
        loss = run("triton", op, student.clone().requires_grad_(), teacher, *args)
    expected = run("reference", op, student, teacher, *args)
    torch.testing.assert_close(loss, expected)


def test_losses_in_float64_accumulate_in_float64():
    torch.manual_seed(14)
    dtype = torch.float64
    student, teacher = randn(2, 5, 3, 4, dtype=dtype), randn(2, 5, 3, 4, dtype=dtype)
    mask = torch.rand(2, 3, 4, device=DEVICE, dtype=dtype)
    tight = {"rtol": 1e-12, "atol": 1e-12}
    for op, inputs, args in (
        (ops.masked_feature_loss, (student, teacher), (mask, "mask")),
        (ops.kd_loss, (student,), (teacher, 4.0, mask)),
        (ops.decoupled_kd_loss, (student,), (teacher, teacher > 0, 1.0, 8.0, 4.0)),
    ):
        loss, grads = loss_and_grads("triton", op, inputs, *args)
        expected_loss, expected_grads = loss_and_grads("reference", op, inputs, *args)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, expected_loss, **tight)
        for grad, expected in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected, **tight)


# kd_loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 129), (2, 5, 3, 4), (1, 3, 1, 17)])
@pytest.mark.parametrize("weighted", [False, True])
def test_kd_loss_matches_reference(dtype, shape, weighted):
    torch.manual_seed(0)
    weight = torch.rand((shape[0],) + shape[2:], device=DEVICE) if weighted else None
    student, teacher = randn(*shape, dtype=dtype, scale=3), randn(*shape, dtype=dtype, scale=3)
    assert_loss_parity(ops.kd_loss, (student,), teacher, 3.0, weight, dtype=dtype)


def test_kd_loss_rows_longer_than_one_block_use_the_online_softmax():
    # 9000 classes exceed the largest tile (4096), so the kernel walks three chunks.
    torch.manual_seed(3)
    student, teacher = randn(3, 9000, scale=4), randn(3, 9000, scale=4)
    weight = torch.rand(3, device=DEVICE)
    assert_loss_parity(ops.kd_loss, (student,), teacher, 2.0, weight, dtype=torch.float32)


def test_kd_loss_non_contiguous_inputs():
    torch.manual_seed(4)
    rows_student = randn(9, 6).t()
    rows_teacher = randn(6, 18)[:, ::2]
    assert_loss_parity(ops.kd_loss, (rows_student,), rows_teacher, 4.0, dtype=torch.float32)
    dense_student = randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last)
    dense_teacher = randn(2, 5, 4, 3).transpose(2, 3)
    weight = torch.rand(2, 4, 3, device=DEVICE).transpose(1, 2)
    assert_loss_parity(
        ops.kd_loss, (dense_student,), dense_teacher, 4.0, weight, dtype=torch.float32
    )


def test_kd_loss_all_zero_weights_give_zero():
    student, teacher = randn(4, 6), randn(4, 6)
    loss, (grad,) = loss_and_grads(
        "triton", ops.kd_loss, (student,), teacher, 4.0, torch.zeros(4, device=DEVICE)
    )
    assert loss.item() == 0 and not grad.any()


# decoupled_kd_loss --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (4, 100), (2, 6, 3, 5)])
def test_decoupled_kd_loss_matches_reference(dtype, shape):
    torch.manual_seed(0)
    student, teacher = randn(*shape, dtype=dtype, scale=3), randn(*shape, dtype=dtype, scale=3)
    class_mask = torch.rand(shape, device=DEVICE) < 0.3
    assert_loss_parity(
        ops.decoupled_kd_loss, (student,), teacher, class_mask, 1.0, 8.0, 4.0, dtype=dtype
    )


def test_decoupled_kd_loss_rows_with_empty_class_set_or_empty_complement():
    torch.manual_seed(5)
    student, teacher = randn(4, 6, scale=2), randn(4, 6, scale=2)
    class_mask = torch.rand(4, 6, device=DEVICE) < 0.5
    class_mask[0] = False
    class_mask[1] = True
    assert_loss_parity(
        ops.decoupled_kd_loss,
        (student,),
        teacher,
        class_mask,
        2.0,
        0.5,
        1.5,
        dtype=torch.float32,
    )


def test_decoupled_kd_loss_long_rows_and_dkd_targets():
    torch.manual_seed(6)
    student, teacher = randn(2, 9000, scale=3), randn(2, 9000, scale=3)
    class_mask = ops.top_class_mask(teacher, student, ratio=0.2)
    assert_loss_parity(
        ops.decoupled_kd_loss,
        (student,),
        teacher,
        class_mask,
        1.0,
        8.0,
        4.0,
        dtype=torch.float32,
    )
    target = torch.randint(0, 9000, (2,), device=DEVICE)
    assert_loss_parity(ops.dkd_loss, (student,), teacher, target, dtype=torch.float32)


def test_decoupled_kd_loss_non_contiguous_dense_inputs():
    torch.manual_seed(7)
    student = randn(2, 7, 3, 4).contiguous(memory_format=torch.channels_last)
    teacher = randn(2, 7, 4, 3).transpose(2, 3)
    target = torch.randint(0, 7, (2, 3, 4), device=DEVICE)
    assert_loss_parity(ops.dkd_loss, (student,), teacher, target, dtype=torch.float32)


# interest_map -------------------------------------------------------------------------------


def quantised_heat(shape, dtype):
    """Heat with many exact ties, so the lower-flat-index rule is exercised."""
    return (torch.rand(shape, device=DEVICE) * 4).round().div(4).to(dtype)


def assert_interest_map_equal(heat, wh, offset, k, kernel):
    result = run("triton", ops.interest_map, heat, wh, offset, k, kernel)
    expected = run("reference", ops.interest_map, heat, wh, offset, k, kernel)
    for value, wanted in zip(result, expected):
        assert value.dtype == wanted.dtype
        assert torch.equal(value, wanted)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, k, kernel",
    [((1, 1, 1, 1), 1, 1), ((2, 1, 8, 8), 8, 3), ((3, 2, 5, 7), 5, 3), ((2, 1, 7, 3), 9, 5)],
)
def test_interest_map_equals_reference(dtype, shape, k, kernel):
    torch.manual_seed(0)
    n, _, h, w = shape
    heat = quantised_heat(shape, dtype)
    wh = (torch.rand(n, 2, h, w, device=DEVICE) * 6).to(dtype)
    offset = torch.rand(n, 2, h, w, device=DEVICE).to(dtype)
    assert_interest_map_equal(heat, wh, offset, k, kernel)


def test_interest_map_boxes_past_the_map_and_non_contiguous_inputs():
    torch.manual_seed(8)
    heat = quantised_heat((2, 1, 6, 5), torch.float32).transpose(2, 3)
    wh = (torch.rand(2, 2, 6, 5, device=DEVICE) * 40).transpose(2, 3)
    offset = torch.rand(2, 2, 5, 6, device=DEVICE) * 8 - 4
    assert_interest_map_equal(heat, wh, offset, 6, 3)


@pytest.mark.slow
def test_interest_map_many_chunks_and_large_k():
    # 2 x 3 x 40 x 40 = 4800 values per image: five candidate chunks per image.
    torch.manual_seed(9)
    heat = quantised_heat((2, 3, 40, 40), torch.float32)
    wh = torch.rand(2, 2, 40, 40, device=DEVICE) * 6
    offset = torch.rand(2, 2, 40, 40, device=DEVICE)
    assert_interest_map_equal(heat, wh, offset, 30, 3)


# feature_augment ----------------------------------------------------------------------------


def augment_with_draws(backend, x, op_ids, magnitudes, seed=0):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    return run(backend, ops.feature_augment, x, op_ids, magnitudes, generator)


def without_noise(op_ids, magnitudes):
    """Noise at magnitude 0 adds nothing, so every backend must agree exactly on the rest."""
    return torch.where(torch.tensor(op_ids, device=DEVICE) == NOISE, 0.0, magnitudes)


def assert_augment_parity(x, op_ids, magnitudes, dtype=torch.float32):
    magnitudes = without_noise(op_ids, magnitudes)
    result = augment_with_draws("triton", x, op_ids, magnitudes)
    expected = augment_with_draws("reference", x, op_ids, magnitudes)
    assert result.dtype == expected.dtype and result.shape == expected.shape
    torch.testing.assert_close(result, expected, **tolerances(dtype))


@pytest.mark.parametrize("op_ids", DEFAULT_PAIRS, ids=str)
def test_feature_augment_default_sub_policies_match_reference(op_ids):
    torch.manual_seed(sum(op_ids))
    x = randn(2, 3, 5, 7)
    assert_augment_parity(x, op_ids, torch.rand(2, device=DEVICE))


@pytest.mark.slow
@pytest.mark.parametrize("op_ids", [pair[::-1] for pair in DEFAULT_PAIRS], ids=str)
def test_feature_augment_reversed_pairs_match_reference(op_ids):
    torch.manual_seed(sum(op_ids))
    x = randn(2, 3, 6, 5)
    assert_augment_parity(x, op_ids, torch.rand(2, device=DEVICE))


@pytest.mark.parametrize(
    "op_ids",
    [(ROTATE,), (CUTOUT,), (CHANNEL_SHUFFLE, CHANNEL_DROP, TRANSLATE_X), (0, 1, 2, 3, 4)],
    ids=str,
)
def test_feature_augment_single_ops_and_longer_sequences(op_ids):
    torch.manual_seed(len(op_ids))
    x = randn(2, 4, 6, 5)
    assert_augment_parity(x, op_ids, torch.rand(len(op_ids), device=DEVICE))


@pytest.mark.parametrize("op_ids", [(SHEAR_X, ROTATE), (CHANNEL_SHUFFLE, CUTOUT)], ids=str)
def test_feature_augment_half_and_non_contiguous(op_ids):
    torch.manual_seed(10)
    x = randn(2, 3, 7, 5, dtype=HALF).transpose(2, 3)
    assert_augment_parity(x, op_ids, torch.rand(2, device=DEVICE), dtype=HALF)


def test_feature_augment_affine_pair_is_composition_not_product():
    # Two 30-degree rotations read bilinear-of-bilinear; one 60-degree resampling differs.
    x = randn(1, 2, 9, 9)
    both = torch.ones(2, device=DEVICE)
    result = augment_with_draws("triton", x, (ROTATE, ROTATE), both)
    torch.testing.assert_close(result, augment_with_draws("reference", x, (ROTATE, ROTATE), both))
    theta = affine_matrix(ROTATE, torch.tensor(60.0, device=DEVICE))[None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    single = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert (result - single).abs().max() > 1e-2


@pytest.mark.parametrize(
    "op_ids", [(ROTATE, NOISE), (CUTOUT, CHANNEL_SHUFFLE), (NOISE, SHEAR_X)], ids=str
)
def test_feature_augment_identical_draws_give_identical_outputs(op_ids):
    x = randn(2, 3, 6, 6)
    magnitudes = torch.full((2,), 0.8, device=DEVICE)
    first = augment_with_draws("triton", x, op_ids, magnitudes, seed=5)
    second = augment_with_draws("triton", x, op_ids, magnitudes, seed=5)
    assert torch.equal(first, second)
    draws = draw_randomness(
        op_ids, x.shape, x.device, torch.Generator(device=DEVICE).manual_seed(5)
    )
    sokd.set_backend("triton")
    direct = native.feature_augment(x, op_ids, op_values(magnitudes, op_ids), draws)
    assert torch.equal(first, direct)


def test_feature_augment_noise_statistics_and_seed_reproducibility():
    x = torch.zeros(4, 8, 16, 16, device=DEVICE)
    magnitude = torch.ones(1, device=DEVICE)
    noise = augment_with_draws("triton", x, (NOISE,), magnitude, seed=11)
    sigma = PRIMITIVES[NOISE].high
    assert abs(noise.mean().item()) < 0.05 * sigma
    assert abs(noise.std().item() - sigma) < 0.05 * sigma
    assert torch.equal(noise, augment_with_draws("triton", x, (NOISE,), magnitude, seed=11))
    assert not torch.equal(noise, augment_with_draws("triton", x, (NOISE,), magnitude, seed=12))
    # The same seed draws the same noise however many programs the map is split into.
    half = augment_with_draws("triton", x[:2], (NOISE,), magnitude, seed=11)
    assert torch.equal(half, noise[:2])


def test_feature_augment_noise_is_read_through_the_second_op():
    # Translate by exactly two pixels after noise: the output is the noise map shifted, so
    # the second op reads the first op's noise at the taps it samples, not fresh noise.
    x = torch.zeros(1, 2, 4, 8, device=DEVICE)
    shift_pixels = 2
    translate = (shift_pixels / 8 - PRIMITIVES[TRANSLATE_X].low) / (
        PRIMITIVES[TRANSLATE_X].high - PRIMITIVES[TRANSLATE_X].low
    )
    noise_only = augment_with_draws("triton", x, (NOISE,), torch.ones(1, device=DEVICE), seed=3)
    magnitudes = torch.tensor([1.0, translate], device=DEVICE)
    shifted = augment_with_draws("triton", x, (NOISE, TRANSLATE_X), magnitudes, seed=3)
    torch.testing.assert_close(
        shifted[..., : 8 - shift_pixels], noise_only[..., shift_pixels:], rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        shifted[..., 8 - shift_pixels :],
        torch.zeros_like(shifted[..., 8 - shift_pixels :]),
        rtol=0,
        atol=1e-5,
    )


# determinism and tracing --------------------------------------------------------------------


def test_losses_are_bitwise_deterministic():
    torch.manual_seed(12)
    student, teacher = randn(3, 40, 4, 4), randn(3, 40, 4, 4)
    mask = torch.rand(3, 4, 4, device=DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for op, args in (
            (ops.masked_feature_loss, (mask, "mask")),
            (ops.kd_loss, (2.0,)),
            (ops.decoupled_kd_loss, (teacher > 0, 1.0, 8.0, 2.0)),
        ):
            first = loss_and_grads("triton", op, (student,), teacher, *args)
            second = loss_and_grads("triton", op, (student,), teacher, *args)
            assert torch.equal(first[0], second[0]) and torch.equal(first[1][0], second[1][0])
    finally:
        torch.use_deterministic_algorithms(previous)


def test_backend_functions_trace_with_fullgraph():
    # The ops' fake implementations let Dynamo capture every op in one graph, which the
    # "eager" backend then runs: the interpreter cannot run under AOT backends' fake tensors.
    sokd.set_backend("triton")
    torch._dynamo.reset()
    torch.manual_seed(13)
    student, teacher = randn(2, 6, 3, 4), randn(2, 6, 3, 4)
    mask = torch.rand(2, 3, 4, device=DEVICE)
    class_mask = teacher > 0.5

    def losses_of(backend):
        def losses(student, teacher, mask, class_mask):
            return (
                backend.masked_feature_loss(student, teacher, mask, "mask")
                + backend.kd_loss(student, teacher, 2.0, mask)
                + backend.decoupled_kd_loss(student, teacher, class_mask, 1.0, 8.0, 2.0)
            )

        return losses

    compiled = torch.compile(losses_of(native), fullgraph=True, backend="eager")
    leaf = student.clone().requires_grad_()
    loss = compiled(leaf, teacher, mask, class_mask)
    (grad,) = torch.autograd.grad(loss, leaf)
    expected_leaf = student.clone().requires_grad_()
    expected = losses_of(reference)(expected_leaf, teacher, mask, class_mask)
    (expected_grad,) = torch.autograd.grad(expected, expected_leaf)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)

    heat = quantised_heat((2, 1, 6, 6), torch.float32)
    wh, offset = torch.rand(2, 2, 6, 6, device=DEVICE) * 3, torch.rand(2, 2, 6, 6, device=DEVICE)
    decode = torch.compile(native.interest_map, fullgraph=True, backend="eager")
    for value, wanted in zip(
        decode(heat, wh, offset, 4, 3), reference.interest_map(heat, wh, offset, 4, 3)
    ):
        assert torch.equal(value, wanted)

    op_ids = (SHEAR_X, CHANNEL_SHUFFLE)
    draws = draw_randomness(op_ids, student.shape, DEVICE, torch.Generator(DEVICE).manual_seed(0))
    values = op_values(torch.rand(2, device=DEVICE), op_ids)

    def augment(x, values, permutation):
        return native.feature_augment(x, op_ids, values, [None, permutation])

    augmented = torch.compile(augment, fullgraph=True, backend="eager")(student, values, draws[1])
    torch.testing.assert_close(augmented, reference.feature_augment(student, op_ids, values, draws))


# realistic shapes, compiled kernels only ----------------------------------------------------

gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="realistic shapes need compiled kernels")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_at_realistic_shapes(dtype):
    torch.manual_seed(15)
    # Gradients here are ~1e-7 each; the atol only absorbs float32 cancellation in p_s - p_t.
    tolerance = {"rtol": 3e-2 if dtype == torch.bfloat16 else 1e-4, "atol": 1e-9}
    student, teacher = randn(8, 256, 64, 64, dtype=dtype), randn(8, 256, 64, 64, dtype=dtype)
    mask = torch.rand(8, 64, 64, device=DEVICE)
    assert_loss_parity(
        ops.masked_feature_loss, (student, teacher), mask, "mask", dtype=dtype, **tolerance
    )
    for shape in [(4096, 1000), (8, 19, 128, 128), (64, 131072)]:
        student, teacher = randn(*shape, dtype=dtype, scale=3), randn(*shape, dtype=dtype, scale=3)
        assert_loss_parity(ops.kd_loss, (student,), teacher, 4.0, dtype=dtype, **tolerance)
        class_mask = ops.top_class_mask(teacher, student)
        assert_loss_parity(
            ops.decoupled_kd_loss,
            (student,),
            teacher,
            class_mask,
            1.0,
            8.0,
            4.0,
            dtype=dtype,
            **tolerance,
        )


@gpu_only
def test_interest_map_and_augment_at_realistic_shapes():
    torch.manual_seed(16)
    heat = quantised_heat((8, 1, 128, 128), torch.float32)
    wh = torch.rand(8, 2, 128, 128, device=DEVICE) * 20
    offset = torch.rand(8, 2, 128, 128, device=DEVICE)
    assert_interest_map_equal(heat, wh, offset, 8, 3)
    x = randn(64, 256, 16, 16)
    for op_ids in [(SHEAR_X, ROTATE), (CUTOUT, CHANNEL_SHUFFLE), (CHANNEL_DROP, TRANSLATE_X)]:
        assert_augment_parity(x, op_ids, torch.rand(2, device=DEVICE))
