"""The native cpu backend (sokd._C) against the pure-PyTorch reference: forward, backward,
dtypes, odd and non-contiguous shapes, random draws, bad input, torch.compile and the
registration of the CUDA kernels."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

import sokd
from sokd import ops
from sokd.augment_ops import NOISE, PRIMITIVES, draw_randomness, op_values

native = pytest.importorskip("sokd.native", reason="sokd._C was not built")
from sokd import _C

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (rtol, atol) for losses and gradients, by input dtype.
TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (2e-2, 1e-3),
}
OPS = ("masked_feature_loss", "kd_loss", "decoupled_kd_loss", "interest_map", "feature_augment")


def on_backend(name, fn, *args, **kwargs):
    sokd.set_backend(name)
    return fn(*args, **kwargs)


def make(shape, dtype, seed, scale=1.0, contiguous=True):
    """A random tensor; non-contiguous ones are a strided view of a bigger buffer."""
    generator = torch.Generator().manual_seed(seed)
    if contiguous:
        return (torch.randn(shape, generator=generator) * scale).to(dtype)
    wide = torch.randn(tuple(shape[:-1]) + (2 * shape[-1],), generator=generator) * scale
    view = wide.to(dtype)[..., ::2]
    assert not view.is_contiguous() or view.numel() <= 1
    return view


def loss_and_grads(backend, fn, inputs, *args):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = on_backend(backend, fn, *leaves, *args)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def assert_loss_parity(fn, inputs, *args, dtype):
    rtol, atol = TOLERANCE[dtype]
    loss, grads = loss_and_grads("cpu", fn, inputs, *args)
    ref_loss, ref_grads = loss_and_grads("reference", fn, inputs, *args)
    assert loss.dtype == ref_loss.dtype
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == ref_grad.dtype and grad.shape == ref_grad.shape
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=rtol * 10, atol=atol)


FEATURE_SHAPES = ((1, 1, 1, 1), (3, 7, 17, 1), (2, 3, 7, 17), (1, 17, 3, 7))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FEATURE_SHAPES)
@pytest.mark.parametrize("normalize", ("elements", "mask"))
@pytest.mark.parametrize("with_mask", (False, True))
def test_masked_feature_loss_parity(dtype, shape, normalize, with_mask):
    contiguous = shape[-1] != 17
    student = make(shape, dtype, 1, contiguous=contiguous)
    teacher = make(shape, dtype, 2)
    mask = None
    if with_mask:
        n, _, h, w = shape
        mask = torch.randint(0, 4, (n, h, w), generator=torch.Generator().manual_seed(3)).float()
    # The teacher takes part in the gradient check: its gradient is -grad student.
    assert_loss_parity(
        lambda s, t: ops.masked_feature_loss(s, t, mask, normalize), (student, teacher),
        dtype=dtype,
    )


def test_masked_feature_loss_zero_mask_gives_zero_loss_and_gradient():
    student = torch.randn(2, 3, 5, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 5, 4)
    loss = on_backend("cpu", ops.masked_feature_loss, student, teacher, torch.zeros(2, 5, 4), "mask")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(student.grad) == 0


LOGIT_SHAPES = (
    (1, 1), (3, 17), (7, 129), (17, 3), (2, 7, 3, 5), (1, 3, 1, 17), (3, 19, 4, 9), (2, 5, 5, 5)
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LOGIT_SHAPES)
@pytest.mark.parametrize("weighted", (False, True))
def test_kd_loss_parity(dtype, shape, weighted):
    student = make(shape, dtype, 4, scale=3.0, contiguous=shape[-1] % 2 == 1)
    teacher = make(shape, dtype, 5, scale=3.0)
    weight = None
    if weighted:
        row_shape = (shape[0],) + tuple(shape[2:])
        weight = torch.rand(row_shape, generator=torch.Generator().manual_seed(6))
    assert_loss_parity(
        lambda s: ops.kd_loss(s, teacher, 2.0, weight), (student,), dtype=dtype
    )


def test_kd_loss_all_zero_weights_give_zero():
    student = torch.randn(2, 5, 3, 3, requires_grad=True)
    loss = on_backend("cpu", ops.kd_loss, student, torch.randn(2, 5, 3, 3), 4.0, torch.zeros(2, 3, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(student.grad) == 0


def class_mask_for(shape, seed):
    """Random class sets, with one row of every kind: empty G, all classes in G, and mixed."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) < 0.3
    rows = mask.movedim(1, -1).reshape(-1, shape[1])
    rows[0] = False
    if rows.shape[0] > 1:
        rows[1] = True
    return rows.reshape(mask.movedim(1, -1).shape).movedim(-1, 1).contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LOGIT_SHAPES)
def test_decoupled_kd_loss_parity(dtype, shape):
    student = make(shape, dtype, 7, scale=3.0, contiguous=shape[-1] % 2 == 0)
    teacher = make(shape, dtype, 8, scale=3.0)
    mask = class_mask_for(shape, 9)
    assert_loss_parity(
        lambda s: ops.decoupled_kd_loss(s, teacher, mask, 1.0, 8.0, 4.0), (student,), dtype=dtype
    )


def test_dkd_loss_parity_with_targets():
    student, teacher = torch.randn(5, 11) * 3, torch.randn(5, 11) * 3
    target = torch.tensor([0, 10, 3, 3, 7])
    assert_loss_parity(lambda s: ops.dkd_loss(s, teacher, target), (student,), dtype=torch.float32)


def test_backward_scales_by_grad_output_and_survives_retain_graph():
    sokd.set_backend("cpu")
    student = torch.randn(2, 3, 4, 5, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 5)
    loss = ops.masked_feature_loss(student, teacher)
    (single,) = torch.autograd.grad(loss, student, retain_graph=True)
    (tripled,) = torch.autograd.grad(3 * loss, student, retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(tripled, 3 * single)
    torch.testing.assert_close(student.grad, 2 * single)
    # In-place changes to the accumulated gradient must not reach the saved one.
    student.grad.zero_()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(student.grad, single)
    # Nor changes to a gradient that backward stored fresh in .grad.
    student.grad = None
    loss.backward(retain_graph=True)
    student.grad.mul_(0)
    student.grad = None
    loss.backward()
    torch.testing.assert_close(student.grad, single)


def test_backward_of_a_call_without_gradient_says_so():
    student = torch.randn(3, 5, requires_grad=True)
    loss, grad = torch.ops.sokd.kd_loss(student, torch.randn(3, 5), 4.0, None, False)
    assert grad.numel() == 0
    with pytest.raises(RuntimeError, match="with_grad=False"):
        loss.backward()


def test_compiled_backward_scales_by_grad_output():
    # The eager backward hands the saved gradient over when the seed is 1; a traced backward
    # must not have that choice baked in.
    sokd.set_backend("cpu")
    torch._dynamo.reset()
    teacher = torch.randn(4, 6)
    student = torch.randn(4, 6, requires_grad=True)
    (unit,) = torch.autograd.grad(ops.kd_loss(student, teacher), student)
    compiled = torch.compile(
        lambda s: ops.kd_loss(s, teacher), fullgraph=True, backend="aot_eager"
    )
    for seed in (1.0, 2.5, 1.0):
        (grad,) = torch.autograd.grad(compiled(student), student, torch.tensor(seed))
        torch.testing.assert_close(grad, seed * unit)


def test_compiled_autograd_runs_the_native_losses():
    sokd.set_backend("cpu")
    torch._dynamo.reset()
    feature, feature_teacher = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    logits, logits_teacher = torch.randn(4, 6), torch.randn(4, 6)

    def step(s, z):
        loss = 2 * ops.kd_loss(z, logits_teacher) + ops.masked_feature_loss(s, feature_teacher)
        loss.backward()

    leaves = feature.clone().requires_grad_(), logits.clone().requires_grad_()
    step(*leaves)
    compiled_leaves = feature.clone().requires_grad_(), logits.clone().requires_grad_()
    with torch._dynamo.config.patch(compiled_autograd=True):
        torch.compile(step, backend="aot_eager")(*compiled_leaves)
    for eager, compiled in zip(leaves, compiled_leaves):
        torch.testing.assert_close(compiled.grad, eager.grad)


def test_losses_do_not_depend_on_the_thread_count():
    sokd.set_backend("cpu")
    # Large enough that at::parallel_for splits every loss into several tasks.
    feature, target = torch.randn(8, 64, 32, 32), torch.randn(8, 64, 32, 32)
    logits, teacher = torch.randn(1024, 100), torch.randn(1024, 100)
    dense, dense_teacher = torch.randn(2, 5, 64, 64), torch.randn(2, 5, 64, 64)

    def losses():
        return torch.stack((
            ops.masked_feature_loss(feature, target),
            ops.kd_loss(logits, teacher),
            ops.kd_loss(dense, dense_teacher),
            ops.decoupled_kd_loss(logits, teacher, logits > 0.5),
            ops.decoupled_kd_loss(dense, dense_teacher, dense > 0.5),
        ))

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = losses()
        torch.set_num_threads(2)
        assert torch.equal(losses(), single)
    finally:
        torch.set_num_threads(previous)


def test_loss_gradcheck_float64():
    sokd.set_backend("cpu")
    feature = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 4, 5, dtype=torch.float64)
    for normalize in ("elements", "mask"):
        assert torch.autograd.gradcheck(
            lambda s, t, mode=normalize: ops.masked_feature_loss(s, t, mask, mode), (feature, target)
        )
    logits = torch.randn(3, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 2, 4, 3, dtype=torch.float64)
    weight = torch.rand(3, 4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: ops.kd_loss(s, teacher, 3.0, weight), (logits,))
    rows = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    teacher_rows = torch.randn(4, 6, dtype=torch.float64)
    class_mask = class_mask_for((4, 6), 10)
    assert torch.autograd.gradcheck(
        lambda s: ops.decoupled_kd_loss(s, teacher_rows, class_mask, 1.0, 8.0, 4.0), (rows,)
    )
    # 9 positions: two vectors of float64 rows in one tile, then a single row.
    dense = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    dense_teacher = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    dense_mask = class_mask_for((2, 5, 3, 3), 11)
    assert torch.autograd.gradcheck(
        lambda s: ops.decoupled_kd_loss(s, dense_teacher, dense_mask, 2.0, 3.0, 2.0), (dense,)
    )


def heat_maps(n, channels, height, width, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    # Few distinct values make ties between peaks common, which exercises the tie rule.
    heat = torch.randint(0, 5, (n, channels, height, width), generator=generator) / 4
    wh = torch.rand((n, 2, height, width), generator=generator) * (width + height)
    offset = torch.rand((n, 2, height, width), generator=generator) * 2 - 0.5
    return heat.to(dtype), wh.to(dtype), offset.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n, channels, height, width, k, kernel",
    [(1, 1, 1, 1, 1, 1), (3, 1, 7, 17, 8, 3), (2, 2, 5, 3, 30, 3), (1, 1, 17, 7, 5, 5),
     (2, 1, 4, 4, 16, 1), (2, 1, 9, 9, 81, 3), (1, 2, 8, 7, 70, 1), (2, 1, 5, 3, 6, 7)],
)
def test_interest_map_equals_reference(dtype, n, channels, height, width, k, kernel):
    heat, wh, offset = heat_maps(n, channels, height, width, dtype, seed=11)
    heat = heat.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    got = on_backend("cpu", ops.interest_map, heat, wh, offset, k, kernel)
    want = on_backend("reference", ops.interest_map, heat, wh, offset, k, kernel)
    for value, expected in zip(got, want):
        assert value.dtype == expected.dtype and value.shape == expected.shape
        assert torch.equal(value, expected)


@pytest.mark.parametrize("k", [1, 8, 40])
def test_interest_map_with_distinct_heat_values_equals_reference(k):
    # Continuous heat: peaks rarely tie, so the k-th value rises through the scan and most
    # candidates are rejected by value alone.
    generator = torch.Generator().manual_seed(5)
    heat = torch.rand((6, 2, 16, 13), generator=generator)
    wh = torch.rand((6, 2, 16, 13), generator=generator) * 10
    offset = torch.rand((6, 2, 16, 13), generator=generator)
    got = on_backend("cpu", ops.interest_map, heat, wh, offset, k, 3)
    want = on_backend("reference", ops.interest_map, heat, wh, offset, k, 3)
    for value, expected in zip(got, want):
        assert torch.equal(value, expected)


def test_interest_map_clamps_huge_boxes_like_reference():
    heat, wh, offset = heat_maps(2, 1, 6, 5, torch.float32, seed=12)
    wh[0] = 1e30
    offset[1] = -1e30
    got = on_backend("cpu", ops.interest_map, heat, wh, offset, 4, 3)
    want = on_backend("reference", ops.interest_map, heat, wh, offset, 4, 3)
    for value, expected in zip(got, want):
        assert torch.equal(value, expected)


def augment_both(x, op_ids, magnitudes, seed):
    outputs = []
    for backend in ("cpu", "reference"):
        generator = torch.Generator().manual_seed(seed)
        outputs.append(on_backend(backend, ops.feature_augment, x, op_ids, magnitudes, generator))
    return outputs


DETERMINISTIC_PAIRS = [
    pair for pair in itertools.combinations(range(len(PRIMITIVES)), 2) if NOISE not in pair
]


@pytest.mark.parametrize("pair", DETERMINISTIC_PAIRS)
def test_feature_augment_pairs_match_reference(pair):
    x = make((2, 5, 7, 9), torch.float32, 13, contiguous=False)
    magnitudes = torch.tensor([0.85, 0.2])
    for op_ids in (pair, pair[::-1]):
        got, want = augment_both(x, op_ids, magnitudes, seed=14)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("op_ids", [(0, 4), (4, 5, 1)])
def test_feature_augment_large_planes_match_reference(dtype, op_ids):
    # Planes above 2048 pixels take the one-vector-of-channels kernel; cutout (5) moves the
    # taps between samples. In float32, source coordinates near 48 round differently in one
    # composed read than in two grid_sample passes (up to ~3e-5); float64 shows the math agrees.
    x = make((3, 19, 48, 47), dtype, 17)
    magnitudes = torch.linspace(0.3, 0.8, len(op_ids))
    got, want = augment_both(x, op_ids, magnitudes, seed=18)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_feature_augment_dtypes_and_long_sequences(dtype):
    x = make((3, 4, 17, 7), dtype, 15)
    rtol, atol = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-5)}.get(
        dtype, (1e-2, 2e-2)
    )
    for op_ids in ((4, 0), (2, 7, 5, 3), (0, 1, 4, 8, 3)):
        magnitudes = torch.linspace(0.1, 0.9, len(op_ids))
        got, want = augment_both(x, op_ids, magnitudes, seed=16)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


def test_feature_augment_identical_draws_give_identical_outputs():
    x = torch.randn(2, 3, 8, 8)
    op_ids = (5, 6, 7)
    first = on_backend("cpu", ops.feature_augment, x, op_ids, torch.full((3,), 0.7),
                       torch.Generator().manual_seed(1))
    again = ops.feature_augment(x, op_ids, torch.full((3,), 0.7), torch.Generator().manual_seed(1))
    other = ops.feature_augment(x, op_ids, torch.full((3,), 0.7), torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_feature_augment_noise_statistics():
    x = torch.zeros(4, 16, 32, 32)
    values = op_values(torch.tensor([1.0]), (NOISE,))
    draws = draw_randomness((NOISE,), x.shape, x.device, torch.Generator().manual_seed(3))
    noise = native.feature_augment(x, (NOISE,), values, draws)
    sigma = float(values[0])
    assert abs(noise.mean().item()) < 0.02 * sigma
    assert abs(noise.std().item() / sigma - 1) < 0.02
    fraction_beyond_two_sigma = (noise.abs() > 2 * sigma).float().mean().item()
    assert abs(fraction_beyond_two_sigma - 0.0455) < 0.005
    # Neighbouring elements are independent draws.
    flat = noise.flatten()
    correlation = torch.corrcoef(torch.stack((flat[:-1], flat[1:])))[0, 1]
    assert abs(correlation.item()) < 0.02
    assert torch.equal(noise, native.feature_augment(x, (NOISE,), values, draws))


def test_feature_augment_noise_goes_through_later_affine_op():
    """Noise before an affine op is resampled with the map, like the reference's noise."""
    x = torch.zeros(1, 1, 6, 6)
    op_ids = (NOISE, 2)
    values = op_values(torch.tensor([1.0, 0.5]), op_ids)  # translate by 0: identity
    draws = draw_randomness(op_ids, x.shape, x.device, torch.Generator().manual_seed(5))
    shifted = native.feature_augment(x, op_ids, values, draws)
    alone = native.feature_augment(x, (NOISE,), values[:1], draws[:1])
    torch.testing.assert_close(shifted, alone, rtol=1e-5, atol=1e-6)


def call_raises(fn, *args):
    with pytest.raises(RuntimeError):
        fn(*args)


def test_direct_op_calls_reject_bad_input():
    sokd_ops = torch.ops.sokd
    feature = torch.randn(2, 3, 4, 5)
    call_raises(sokd_ops.masked_feature_loss, feature, feature[:, :2], None, False, True)
    call_raises(sokd_ops.masked_feature_loss, feature, feature.double(), None, False, True)
    call_raises(sokd_ops.masked_feature_loss, feature[0], feature[0], None, False, True)
    call_raises(sokd_ops.masked_feature_loss, feature, feature, torch.ones(2, 4, 4), False, True)
    call_raises(sokd_ops.masked_feature_loss, feature.int(), feature.int(), None, False, True)
    call_raises(sokd_ops.masked_feature_loss, feature[:0], feature[:0], None, False, True)
    logits = torch.randn(4, 6)
    call_raises(sokd_ops.kd_loss, logits, logits[:3], 4.0, None, True)
    call_raises(sokd_ops.kd_loss, logits, logits, 0.0, None, True)
    call_raises(sokd_ops.kd_loss, logits, logits, 4.0, torch.ones(3), True)
    call_raises(sokd_ops.kd_loss, logits[None], logits[None], 4.0, None, True)
    call_raises(sokd_ops.decoupled_kd_loss, logits, logits, torch.ones(4, 6), 1.0, 8.0, 4.0, True)
    call_raises(sokd_ops.decoupled_kd_loss, logits, logits, torch.ones(4, 5, dtype=torch.bool),
                1.0, 8.0, 4.0, True)
    heat, wh, offset = heat_maps(2, 1, 4, 4, torch.float32, seed=1)
    call_raises(sokd_ops.interest_map, heat, wh, offset, 17, 3)
    call_raises(sokd_ops.interest_map, heat, wh, offset, 0, 3)
    call_raises(sokd_ops.interest_map, heat, wh, offset, 4, 2)
    call_raises(sokd_ops.interest_map, heat, wh[:, :1], offset, 4, 3)
    call_raises(sokd_ops.interest_map, heat, wh.double(), offset, 4, 3)
    values = torch.zeros(2)
    call_raises(sokd_ops.feature_augment, feature, [0, 9], values, [None, None], [0, 0])
    call_raises(sokd_ops.feature_augment, feature, [0, 1, 2], torch.zeros(3), [None] * 3, [0] * 3)
    call_raises(sokd_ops.feature_augment, feature, [0], values, [None], [0])
    call_raises(sokd_ops.feature_augment, feature, [7], torch.zeros(1), [None], [0])
    call_raises(sokd_ops.feature_augment, feature, [7], torch.zeros(1),
                [torch.full((2, 3), 3, dtype=torch.int64)], [0])
    call_raises(sokd_ops.feature_augment, feature, [8], torch.zeros(1),
                [torch.zeros(2, 4)], [0])
    call_raises(sokd_ops.feature_augment, feature, [5], torch.zeros(1),
                [torch.zeros(2, 2)], [0])


def test_public_ops_reject_bad_input_on_cpu_backend():
    sokd.set_backend("cpu")
    with pytest.raises(ValueError, match="teacher"):
        ops.masked_feature_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="temperature"):
        ops.kd_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=-1.0)
    with pytest.raises(ValueError, match="k must be"):
        ops.interest_map(*heat_maps(1, 1, 2, 2, torch.float32, seed=2), k=5)


def test_long_op_sequences_split_into_passes():
    assert list(native._passes((0, 1, 2))) == [(0, 2), (2, 3)]
    assert list(native._passes((5, 0, 6, 1, 7, 8))) == [(0, 6)]
    assert list(native._passes(tuple(range(5, 9)) * 3)) == [(0, 8), (8, 12)]
    x = make((1, 2, 9, 7), torch.float32, 17)
    op_ids = (0, 1, 2, 3, 4)
    got, want = augment_both(x, op_ids, torch.linspace(0.2, 0.8, 5), seed=18)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compile_traces_every_op_without_graph_break():
    sokd.set_backend("cpu")
    torch._dynamo.reset()
    student = torch.randn(2, 3, 5, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 5, 4)
    logits = torch.randn(2, 7, 3, 3, requires_grad=True)
    teacher_logits = torch.randn(2, 7, 3, 3)
    class_mask = class_mask_for((2, 7, 3, 3), 19)
    heat, wh, offset = heat_maps(2, 1, 5, 4, torch.float32, seed=20)
    op_ids = (0, 5)
    values = op_values(torch.tensor([0.3, 0.9]), op_ids)
    draws = draw_randomness(op_ids, student.shape, "cpu", torch.Generator().manual_seed(0))

    def losses(s, z):
        count, _, _ = ops.interest_map(heat, wh, offset, 3, 3)
        feat = ops.masked_feature_loss(s, teacher, count, "mask")
        kd = ops.kd_loss(z, teacher_logits, 4.0, count[:, :3, :3])
        dkd = ops.decoupled_kd_loss(z, teacher_logits, class_mask, 1.0, 8.0, 4.0)
        augmented = native.feature_augment(s.detach(), op_ids, values, draws)
        return feat + kd + dkd + augmented.mean()

    # The eager run comes first: the registry imports a backend on first use, which dynamo
    # cannot trace.
    eager = losses(student, logits)
    eager.backward()
    eager_grads = student.grad, logits.grad
    student.grad, logits.grad = None, None
    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    total = compiled(student, logits)
    total.backward()
    torch.testing.assert_close(total, eager)
    torch.testing.assert_close(student.grad, eager_grads[0])
    torch.testing.assert_close(logits.grad, eager_grads[1])


def test_compile_traces_sokd_loss_without_graph_break():
    sokd.set_backend("cpu")
    torch._dynamo.reset()
    torch.manual_seed(0)
    criterion = sokd.SoKDLoss(4, 4, logit_loss="kd").eval()
    student = torch.randn(2, 4, 6, 6, requires_grad=True)
    teacher = torch.randn(2, 4, 6, 6)
    logits = torch.randn(2, 5, requires_grad=True)
    teacher_logits = torch.randn(2, 5)

    def step(s, z):
        return criterion(s, teacher, z, teacher_logits).total

    eager = step(student, logits)
    total = torch.compile(step, fullgraph=True, backend="aot_eager")(student, logits)
    total.backward()
    torch.testing.assert_close(total, eager)


def test_ordinary_cpu_calls_reach_the_cpp_kernels_without_python(tmp_path):
    """Without the Triton interpreter the CPU key keeps the C++ kernels (no Python per call);
    the CUDA key holds the router of sokd/native.py. The choice is made at import, so it is
    checked in a fresh process, started outside the checkout so that it imports the installed
    package rather than ./sokd."""
    script = (
        "import torch, sokd.native\n"
        "for op in sokd.native.KERNEL_OPS:\n"
        "    rows = torch._C._dispatch_dump_table(f'sokd::{op}').splitlines()\n"
        "    print(op, *(r for r in rows if r.startswith(('CPU:', 'CUDA:'))), sep='|')\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    tables = dict(line.split("|", 1) for line in result.stdout.splitlines())
    assert set(tables) == set(OPS) | {"logit_distill_loss"}
    for op, rows in tables.items():
        cpu, cuda = rows.split("|")
        assert f"csrc/cpu/{op}_kernel.cpp" in cpu, cpu
        assert "sokd/native.py" in cuda, cuda


def test_every_op_has_a_cpu_kernel_and_a_cuda_router():
    """The CUDA key holds the router between the Triton launcher and the C++ CUDA kernel
    whether or not the latter was built; supported_devices says whether it was. A composite op
    has one kernel for every device instead."""
    assert set(native.KERNEL_OPS) == set(OPS) | {"logit_distill_loss"}
    for op in native.KERNEL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sokd::{op}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sokd::{op}", "CUDA")
    composite = "sokd::fused_linear_distill_loss"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(composite, "CompositeExplicitAutograd")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(composite, "CPU")
    assert ("cuda" in native.supported_devices()) == bool(_C.WITH_CUDA)
