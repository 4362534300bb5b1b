"""Property tests: every kernel backend agrees with the reference, forward and backward, for
every op, on shapes, strides, dtypes and values drawn by hypothesis.

Values come from a drawn seed and a drawn style (so a failing example is reproducible and
small); the edge cases the kernels are most likely to get wrong are drawn on purpose: size-1
dimensions, K = 1 and 2, k = heat_channels*H*W, all-zero and all-one masks, empty and full
class masks, tied peaks, boxes that touch the borders and centres pushed outside the map.
"""

import pytest
import torch
from backend_matrix import (
    KERNEL_TARGETS,
    LAYOUTS_2D,
    LAYOUTS_4D,
    arrange,
    assert_matches,
    example_budget,
    fixed_profile,
    leaf,
    target_params,
    using,
)
from hypothesis import given
from hypothesis import strategies as st

from sokd import ops
from sokd.augment_ops import NOISE, NUM_PRIMITIVES

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
SEEDS = st.integers(0, 2**31 - 1)
SMALL = st.integers(1, 4)
# Multiplies the loss before backward, so a kernel that ignores grad_output is caught.
GRAD_SCALES = st.sampled_from([1.0, 0.37, -2.5])

pytestmark = pytest.mark.parametrize("target", **target_params(KERNEL_TARGETS))


def normal(shape, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * scale


def uniform(shape, seed, low=0.0, high=1.0):
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def place(values, dtype, layout, device):
    """Values cast to dtype on device, then laid out (after the move, which would undo it)."""
    return arrange(values.to(device=device, dtype=dtype), layout)


def losses_and_grads(backend, loss_fn, inputs, grad_scale):
    """The loss and the gradient of grad_scale*loss for each input that requires grad (None
    for an input that requires grad but receives none)."""
    with using(backend):
        loss = loss_fn(*inputs)
    wanted = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not loss.requires_grad:
        return loss, [None] * len(wanted)
    grads = torch.autograd.grad(loss * grad_scale, wanted, allow_unused=True)
    return loss, list(grads)


def compare_losses(
    target, loss_fn, make_inputs, grad_scale, what, loss_scale=0.0, grad_scale_of_entry=0.0
):
    """Loss and gradients of the target against the reference. The optional scales are what a
    loss and a gradient entry amount to before cancellation (a KL of equal distributions is 0
    only up to rounding)."""
    expected_loss, expected_grads = losses_and_grads(
        "reference", loss_fn, make_inputs(), grad_scale
    )
    loss, grads = losses_and_grads(target.backend, loss_fn, make_inputs(), grad_scale)
    assert_matches(loss, expected_loss, f"{what} loss", loss_scale)
    for index, (grad, expected) in enumerate(zip(grads, expected_grads)):
        if expected is None:
            assert grad is None or not grad.any(), f"{what}: input {index} must get no gradient"
        else:
            assert grad is not None, f"{what}: input {index} got no gradient"
            assert_matches(
                grad, expected, f"{what} gradient of input {index}", abs(grad_scale_of_entry)
            )


# --- masked_feature_loss -------------------------------------------------------------------


@st.composite
def feature_loss_cases(draw):
    shape = tuple(draw(SMALL) for _ in range(4))
    n, _, h, w = shape
    mask_style = draw(st.sampled_from([None, "random", "zeros", "ones", "binary"]))
    seed = draw(SEEDS)
    mask = {
        None: None,
        "random": uniform((n, h, w), seed + 2, 0.0, 2.0),
        "zeros": torch.zeros(n, h, w, dtype=torch.float64),
        "ones": torch.ones(n, h, w, dtype=torch.float64),
        "binary": (uniform((n, h, w), seed + 2) > 0.5).double(),
    }[mask_style]
    return {
        "student": normal(shape, seed),
        "teacher": normal(shape, seed + 1),
        "mask": mask,
        "dtype": draw(DTYPES),
        "layouts": (draw(st.sampled_from(LAYOUTS_4D)), draw(st.sampled_from(LAYOUTS_4D))),
        "mask_layout": draw(st.sampled_from(LAYOUTS_2D)),
        "normalize": draw(st.sampled_from(["elements", "mask"])),
        "requires_grad": draw(
            st.sampled_from([(True, False), (True, True), (False, True), (False, False)])
        ),
        "grad_scale": draw(GRAD_SCALES),
    }


def test_masked_feature_loss_matches_reference(target):
    @fixed_profile(example_budget(target, 30))
    @given(case=feature_loss_cases())
    def check(case):
        def make_inputs():
            tensors = [
                leaf(place(case[name], case["dtype"], layout, target.device), requires_grad)
                for name, layout, requires_grad in zip(
                    ("student", "teacher"), case["layouts"], case["requires_grad"]
                )
            ]
            mask = case["mask"]
            if mask is not None:
                mask = place(mask, case["dtype"], case["mask_layout"], target.device)
            return (*tensors, mask)

        def loss_fn(student, teacher, mask):
            return ops.masked_feature_loss(student, teacher, mask, case["normalize"])

        compare_losses(target, loss_fn, make_inputs, case["grad_scale"], "masked_feature_loss")

    check()


# --- kd_loss and decoupled_kd_loss -----------------------------------------------------------


@st.composite
def logit_shapes(draw):
    """N x K or dense N x K x H x W, with K = 1 and 2 drawn often."""
    classes = draw(st.one_of(st.sampled_from([1, 2]), st.integers(3, 40)))
    if draw(st.booleans()):
        return (draw(SMALL), classes)
    return (draw(st.integers(1, 3)), classes, draw(st.integers(1, 3)), draw(st.integers(1, 3)))


@st.composite
def logit_pairs(draw):
    shape = draw(logit_shapes())
    seed = draw(SEEDS)
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    layouts = LAYOUTS_2D if len(shape) == 2 else LAYOUTS_4D
    student = normal(shape, seed, scale)
    # A teacher equal to the student gives KL = 0 exactly, where cancellation errors show.
    teacher = student.clone() if draw(st.booleans()) else normal(shape, seed + 1, scale)
    return {
        "shape": shape,
        "seed": seed,
        "student": student,
        "teacher": teacher,
        "dtype": draw(DTYPES),
        "layouts": (draw(st.sampled_from(layouts)), draw(st.sampled_from(layouts))),
        "temperature": draw(st.sampled_from([0.5, 1.0, 4.0, 10.0])),
        "requires_grad": draw(st.booleans()),
        "grad_scale": draw(GRAD_SCALES),
    }


def logit_scales(case):
    """(loss scale, gradient entry scale) of a KL between softmaxes of z/T: T^2 per nat, and
    T * grad_scale / rows per unit of probability, both times max|z|/T, the size of the
    rounding error of z/T in units of one."""
    temperature = case["temperature"]
    logit_size = max(1.0, float(case["student"].abs().max()) / temperature)
    rows = case["student"].numel() // case["shape"][1]
    return (
        temperature**2 * logit_size,
        temperature * case["grad_scale"] * logit_size / rows,
    )


def logit_inputs(case, target, extra=()):
    student = leaf(
        place(case["student"], case["dtype"], case["layouts"][0], target.device),
        case["requires_grad"],
    )
    # The teacher requires grad too: backends must still give it no gradient.
    teacher = leaf(place(case["teacher"], case["dtype"], case["layouts"][1], target.device), True)
    return (student, teacher, *extra)


@st.composite
def kd_cases(draw):
    case = draw(logit_pairs())
    rows = (case["shape"][0],) + case["shape"][2:]
    case["weight"] = draw(
        st.sampled_from(
            [
                None,
                uniform(rows, case["seed"] + 3),
                torch.zeros(rows, dtype=torch.float64),
                (uniform(rows, case["seed"] + 3) > 0.5).double(),
            ]
        )
    )
    return case


def test_kd_loss_matches_reference(target):
    @fixed_profile(example_budget(target, 30))
    @given(case=kd_cases())
    def check(case):
        def make_inputs():
            weight = case["weight"]
            if weight is not None:
                weight = weight.to(device=target.device, dtype=case["dtype"])
            return logit_inputs(case, target, (weight,))

        def loss_fn(student, teacher, weight):
            return ops.kd_loss(student, teacher, case["temperature"], weight)

        compare_losses(
            target, loss_fn, make_inputs, case["grad_scale"], "kd_loss", *logit_scales(case)
        )

    check()


def class_mask_of(style, student, teacher, seed):
    if style == "empty":
        return torch.zeros(student.shape, dtype=torch.bool)
    if style == "full":
        return torch.ones(student.shape, dtype=torch.bool)
    if style == "target":
        classes = student.shape[1]
        rows = (student.shape[0],) + tuple(student.shape[2:])
        target = torch.randint(0, classes, rows, generator=torch.Generator().manual_seed(seed))
        return torch.zeros(student.shape, dtype=torch.bool).scatter_(1, target.unsqueeze(1), True)
    if style == "mutual_top":
        return ops.top_class_mask(teacher, student, ratio=0.5)
    return uniform(student.shape, seed) > 0.5


@st.composite
def decoupled_cases(draw):
    case = draw(logit_pairs())
    style = draw(st.sampled_from(["empty", "full", "target", "mutual_top", "random"]))
    case["class_mask"] = class_mask_of(style, case["student"], case["teacher"], case["seed"] + 5)
    case["alpha"] = draw(st.sampled_from([0.0, 1.0, 2.5]))
    case["beta"] = draw(st.sampled_from([0.0, 1.0, 8.0]))
    return case


def test_decoupled_kd_loss_matches_reference(target):
    @fixed_profile(example_budget(target, 30))
    @given(case=decoupled_cases())
    def check(case):
        def make_inputs():
            return logit_inputs(case, target, (case["class_mask"].to(target.device),))

        def loss_fn(student, teacher, class_mask):
            return ops.decoupled_kd_loss(
                student, teacher, class_mask, case["alpha"], case["beta"], case["temperature"]
            )

        scales = [(case["alpha"] + case["beta"]) * scale for scale in logit_scales(case)]
        compare_losses(
            target, loss_fn, make_inputs, case["grad_scale"], "decoupled_kd_loss", *scales
        )

    check()


# --- interest_map ----------------------------------------------------------------------------


@st.composite
def interest_cases(draw):
    n, channels = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    seed = draw(SEEDS)
    heat_style = draw(st.sampled_from(["uniform", "levels", "constant"]))
    if heat_style == "uniform":
        heat = uniform((n, channels, h, w), seed)
    elif heat_style == "levels":
        # Few distinct values: many equal peaks, so the lower-flat-index tie rule decides.
        heat = torch.floor(uniform((n, channels, h, w), seed) * 4) / 4
    else:
        heat = torch.full((n, channels, h, w), 0.5, dtype=torch.float64)
    side = max(h, w)
    # Sizes up to twice the map make boxes run into every border; offsets of up to twice the
    # map either way push centres outside it.
    wh = uniform((n, 2, h, w), seed + 1, 0.0, 2.0 * side)
    offset = uniform((n, 2, h, w), seed + 2, -2.0 * side, 2.0 * side)
    candidates = channels * h * w
    return {
        "maps": (heat, wh, offset),
        "dtype": draw(DTYPES),
        "layouts": tuple(draw(st.sampled_from(LAYOUTS_4D)) for _ in range(3)),
        "k": draw(st.one_of(st.just(candidates), st.just(1), st.integers(1, candidates))),
        "kernel": draw(st.sampled_from([1, 3, 5, 7])),
    }


def test_interest_map_matches_reference(target):
    @fixed_profile(example_budget(target, 40))
    @given(case=interest_cases())
    def check(case):
        def run(backend):
            maps = [
                place(values, case["dtype"], layout, target.device)
                for values, layout in zip(case["maps"], case["layouts"])
            ]
            with using(backend):
                return ops.interest_map(*maps, k=case["k"], kernel=case["kernel"])

        expected = run("reference")
        actual = run(target.backend)
        for name, value, reference in zip(("count_map", "boxes", "scores"), actual, expected):
            assert value.dtype == reference.dtype, f"interest_map {name} dtype"
            assert torch.equal(value, reference), f"interest_map {name}:\n{value}\n!=\n{reference}"

    check()


# --- feature_augment -------------------------------------------------------------------------


@st.composite
def augment_cases(draw):
    shape = (draw(st.integers(1, 3)), draw(SMALL), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    op_ids = draw(st.lists(st.integers(0, NUM_PRIMITIVES - 1), min_size=1, max_size=3))
    magnitude = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(-0.25, 1.25))
    magnitudes = [draw(magnitude) for _ in op_ids]
    # Noise is reproducible per backend only (SPEC section 1); at magnitude <= 0 it adds
    # exactly 0 * eps, which every backend must get right, including for extreme eps.
    magnitudes = [min(m, 0.0) if op == NOISE else m for op, m in zip(op_ids, magnitudes)]
    seed = draw(SEEDS)
    return {
        "x": normal(shape, seed),
        "dtype": draw(DTYPES),
        "layout": draw(st.sampled_from(LAYOUTS_4D)),
        "op_ids": op_ids,
        "magnitudes": torch.tensor(magnitudes, dtype=torch.float32),
        "seed": seed,
        "grad_output": normal(shape, seed + 1),
    }


def test_feature_augment_matches_reference(target):
    @fixed_profile(example_budget(target, 30))
    @given(case=augment_cases())
    def check(case):
        def run(backend):
            x = place(case["x"], case["dtype"], case["layout"], target.device)
            magnitudes = leaf(case["magnitudes"].to(target.device), True)
            generator = torch.Generator().manual_seed(case["seed"])
            with using(backend):
                out = ops.feature_augment(x, case["op_ids"], magnitudes, generator)
            grad_output = case["grad_output"].to(device=target.device, dtype=out.dtype)
            (grad,) = torch.autograd.grad(out, magnitudes, grad_output)
            return out, grad

        expected_out, expected_grad = run("reference")
        out, grad = run(target.backend)
        assert_matches(out, expected_out, f"feature_augment{case['op_ids']}")
        assert_matches(grad, expected_grad, f"feature_augment{case['op_ids']} magnitude gradient")

    check()
