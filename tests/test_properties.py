"""Property tests: every kernel backend agrees with the reference, forward and backward, for
every op, on shapes, strides, dtypes and values drawn by hypothesis.

Values come from a drawn seed and a drawn style (so a failing example is reproducible and
small); the edge cases the kernels are most likely to get wrong are drawn on purpose: size-1
dimensions, K = 1 and 2, k = heat_channels*H*W, all-zero and all-one masks, empty and full
class masks, tied peaks, boxes that touch the borders and centres pushed outside the map.
"""

import math

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
    # Noise is reproducible per backend only (docs/algorithm.md §1); at magnitude <= 0 it adds
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


# --- beyond the accepted range ---------------------------------------------------------------
#
# Arguments drawn across each op's accepted range and past it: kernel sizes, k, temperatures,
# weights, alpha and beta, mask scales, ratios, op ids and magnitudes, shapes with zero-size
# dimensions, integer and bool dtypes, non-finite values, every memory layout. For every draw a
# backend either raises the reference's ValueError or TypeError, whose message names the
# argument, or returns the reference's values (NaN where the reference has NaN). Any other
# exception, a crash or a hang fails the test.

# Mostly floating types, so that most draws reach the kernels.
ANY_DTYPE = st.sampled_from(
    [torch.float32, torch.float64, torch.float16, torch.bfloat16] * 3 + [torch.int64, torch.bool]
)


@st.composite
def wide_shape(draw, dims):
    """Sizes drawn from `dims` (strategies), one of them 0 in about one draw of eight."""
    shape = [draw(dim) for dim in dims]
    if draw(st.integers(0, 7)) == 0:
        shape[draw(st.integers(0, len(shape) - 1))] = 0
    return tuple(shape)


@st.composite
def mostly(draw, accepted, rejected):
    """A value from `accepted` in two draws of three, else one from `rejected`."""
    return draw(accepted if draw(st.integers(0, 2)) else rejected)


WIDE_TEMPERATURES = mostly(
    st.one_of(st.sampled_from([1e-2, 0.5, 4.0, 1e3]), st.floats(1e-2, 1e3)),
    st.sampled_from([0.0, -1.0, 1e-30, 1e-3, 1e4, 1e30, float("nan"), float("inf"), True, "4"]),
)
WIDE_COEFFICIENTS = mostly(
    st.sampled_from([0.0, 0.5, 1.0, 8.0, 1e6]), st.sampled_from([-1.0, float("nan"), float("inf")])
)
VALUE_SCALES = st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 30.0, 1e4])
POISON = st.sampled_from([None, float("nan"), float("inf"), -float("inf")])


def beyond_budget(target, compiled_examples):
    """Most draws here are cheap rejections, but interpreted Triton pays seconds for each one
    that runs: a handful there, the full budget elsewhere."""
    return 6 if target.interpreted else compiled_examples


def _with_poison(values, poison, seed):
    """values with one drawn entry set to a non-finite value (or unchanged for None)."""
    if poison is None or values.numel() == 0:
        return values
    values = values.clone()
    values.view(-1)[seed % values.numel()] = poison
    return values


def _cast(values, dtype, layout, device):
    if dtype in (torch.int64, torch.bool):
        return values.to(device=device, dtype=dtype)
    return place(values, dtype, layout, device)


def outcome(backend, call):
    """("ok", result) or ("raised", type, message) for ValueError/TypeError."""
    with using(backend):
        try:
            return ("ok", call())
        except (ValueError, TypeError) as error:
            return ("raised", type(error), str(error))


def assert_same_outcome(target, call, names, what, natural_scale=0.0, rejected=None):
    """The target does what the reference does: the same ValueError/TypeError, naming one of
    `names`, or the same values. `rejected` (when known) says whether the draw holds an
    argument outside the documented range, which must raise."""
    expected = outcome("reference", call)
    actual = outcome(target.backend, call)
    if rejected is not None:
        assert (expected[0] == "raised") == rejected, f"{what}: rejected={rejected}: {expected}"
    if expected[0] == "raised":
        assert actual[0] == "raised", f"{what}: reference raised {expected[1:]}, target returned"
        assert actual[1:] == expected[1:], f"{what}: {actual[1:]} != {expected[1:]}"
        assert any(name in expected[2] for name in names), f"{what}: unnamed: {expected[2]}"
        return
    assert actual[0] == "ok", f"{what}: target raised {actual[1:]}, reference returned"
    results = actual[1] if isinstance(actual[1], tuple) else (actual[1],)
    references = expected[1] if isinstance(expected[1], tuple) else (expected[1],)
    for index, (value, reference) in enumerate(zip(results, references)):
        assert_matches(value, reference, f"{what} output {index}", natural_scale)


@st.composite
def wide_logit_cases(draw):
    classes = st.sampled_from([1, 2, 5])
    dense = draw(st.booleans())
    if dense:
        shape = draw(wide_shape((st.integers(1, 3), classes, st.integers(1, 2), st.just(2))))
    else:
        shape = draw(wide_shape((st.integers(1, 3), classes)))
    seed = draw(SEEDS)
    scale = draw(VALUE_SCALES)
    layouts = LAYOUTS_4D if dense else LAYOUTS_2D
    return {
        "shape": shape,
        "seed": seed,
        "scale": scale,
        "student": _with_poison(normal(shape, seed, scale), draw(POISON), seed),
        "teacher": normal(shape, seed + 1, scale),
        "dtype": draw(ANY_DTYPE),
        "layout": draw(st.sampled_from(layouts)),
        "temperature": draw(WIDE_TEMPERATURES),
        "weight_style": draw(st.sampled_from([None, None, "uniform", "uniform", "negative", "zeros",
                                              "nan", "wrong shape"])),
        "alpha": draw(WIDE_COEFFICIENTS),
        "beta": draw(WIDE_COEFFICIENTS),
        "target_offset": draw(mostly(st.just(0), st.sampled_from([-1, 1]))),
    }


def _wide_logits(case, device):
    student = _cast(case["student"], case["dtype"], case["layout"], device)
    teacher = _cast(case["teacher"], case["dtype"], case["layout"], device)
    return student, teacher


def _wide_weight(case, device):
    rows = (case["shape"][0],) + case["shape"][2:]
    style = case["weight_style"]
    if style is None:
        return None
    if style == "wrong shape":
        return torch.ones((rows[0] + 1,) + rows[1:], device=device)
    values = {"uniform": uniform(rows, case["seed"] + 3), "zeros": torch.zeros(rows),
              "negative": uniform(rows, case["seed"] + 3) - 0.5,
              "nan": _with_poison(uniform(rows, case["seed"] + 3), float("nan"), 0)}[style]
    return values.to(device=device, dtype=torch.float32)


def _is_real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _logits_rejected(case):
    """Whether the draw's logits or temperature lie outside what kd_loss accepts."""
    temperature = case["temperature"]
    return (
        0 in case["shape"]
        or case["dtype"] in (torch.int64, torch.bool)
        or not (_is_real(temperature) and 1e-2 <= temperature <= 1e3)
    )


def _coefficients_rejected(case):
    return not all(
        _is_real(value) and math.isfinite(value) and value >= 0
        for value in (case["alpha"], case["beta"])
    )


def _wide_scale(case):
    temperature = case["temperature"]
    if isinstance(temperature, float) and 1e-2 <= temperature <= 1e3:
        return temperature**2 * max(1.0, case["scale"] / temperature) * 4
    return 0.0


def test_kd_loss_beyond_the_accepted_range(target):
    @fixed_profile(beyond_budget(target, 60))
    @given(case=wide_logit_cases())
    def check(case):
        def call():
            student, teacher = _wide_logits(case, target.device)
            weight = _wide_weight(case, target.device)
            return ops.kd_loss(student, teacher, case["temperature"], weight)

        names = ("student_logits", "teacher_logits", "temperature", "weight")
        rejected = _logits_rejected(case) or case["weight_style"] in ("negative", "wrong shape")
        assert_same_outcome(target, call, names, "kd_loss", _wide_scale(case), rejected)

    check()


def test_dkd_losses_beyond_the_accepted_range(target):
    @fixed_profile(beyond_budget(target, 60))
    @given(case=wide_logit_cases())
    def check(case):
        def call_dkd():
            student, teacher = _wide_logits(case, target.device)
            rows = (case["shape"][0],) + case["shape"][2:]
            classes = max(case["shape"][1], 1)
            labels = torch.randint(0, classes, rows, generator=torch.Generator().manual_seed(1))
            labels = (labels + case["target_offset"] * classes).to(target.device)
            return ops.dkd_loss(student, teacher, labels, case["alpha"], case["beta"],
                                case["temperature"])

        def call_decoupled():
            student, teacher = _wide_logits(case, target.device)
            class_mask = (uniform(case["shape"], case["seed"] + 4) > 0.5).to(target.device)
            return ops.decoupled_kd_loss(student, teacher, class_mask, case["alpha"],
                                         case["beta"], case["temperature"])

        names = ("student_logits", "teacher_logits", "temperature", "target", "alpha", "beta",
                 "class_mask")
        scale = _wide_scale(case)
        if isinstance(case["alpha"], float) and isinstance(case["beta"], float):
            scale *= max(1.0, abs(case["alpha"]) + abs(case["beta"]))
        rejected = _logits_rejected(case) or _coefficients_rejected(case)
        assert_same_outcome(target, call_dkd, names, "dkd_loss", scale,
                            rejected or case["target_offset"] != 0)
        assert_same_outcome(target, call_decoupled, names, "decoupled_kd_loss", scale, rejected)

    check()


@st.composite
def wide_feature_cases(draw):
    shape = draw(wide_shape((st.integers(1, 2), st.integers(1, 3), st.integers(1, 4),
                             st.integers(1, 4))))
    seed = draw(SEEDS)
    return {
        "student": _with_poison(normal(shape, seed), draw(POISON), seed),
        "teacher": normal(shape, seed + 1),
        "mask_scale": draw(st.one_of(
            st.sampled_from([1e-45, 1e-23, 1e-22, 1e19, 1e20, 1e30]),
            st.integers(-40, 38).map(lambda e: 10.0**e),
            st.sampled_from([None, 0.0, 1.0]),
        )),
        "dtype": draw(ANY_DTYPE),
        "layouts": (draw(st.sampled_from(LAYOUTS_4D)), draw(st.sampled_from(LAYOUTS_4D))),
        "normalize": draw(st.sampled_from(["mask", "mask", "elements", "mean"])),
    }


def test_masked_feature_loss_beyond_the_accepted_range(target):
    @fixed_profile(beyond_budget(target, 60))
    @given(case=wide_feature_cases())
    def check(case):
        n, _, h, w = case["student"].shape

        def call():
            student = _cast(case["student"], case["dtype"], case["layouts"][0], target.device)
            teacher = _cast(case["teacher"], case["dtype"], case["layouts"][1], target.device)
            mask = None
            if case["mask_scale"] is not None:
                values = (uniform((n, h, w), 7) + 0.5) * case["mask_scale"]
                mask = values.to(device=target.device, dtype=torch.float32)
            return ops.masked_feature_loss(student, teacher, mask, case["normalize"])

        names = ("student", "teacher", "mask", "normalize")
        assert_same_outcome(target, call, names, "masked_feature_loss")
        unit_scale = dict(case, mask_scale=1.0)
        float32 = torch.finfo(torch.float32)
        if case["normalize"] == "mask" and case["mask_scale"] is not None and (
            float32.tiny <= case["mask_scale"] * 0.5 and case["mask_scale"] * 1.5 <= float32.max
        ):
            # The mask-normalised loss does not depend on the mask's scale (wherever the mask
            # itself is representable: subnormal masks lose their shape).
            invariant = outcome(target.backend, lambda: _feature_call(unit_scale, target))
            scaled = outcome(target.backend, call)
            if invariant[0] == "ok":
                torch.testing.assert_close(scaled[1], invariant[1], rtol=1e-3, atol=0,
                                           equal_nan=True)

    check()


def _feature_call(case, target):
    n, _, h, w = case["student"].shape
    student = _cast(case["student"], case["dtype"], case["layouts"][0], target.device)
    teacher = _cast(case["teacher"], case["dtype"], case["layouts"][1], target.device)
    values = (uniform((n, h, w), 7) + 0.5) * case["mask_scale"]
    mask = values.to(device=target.device, dtype=torch.float32)
    return ops.masked_feature_loss(student, teacher, mask, case["normalize"])


@st.composite
def wide_interest_cases(draw):
    shape = draw(wide_shape((st.integers(1, 2), st.integers(1, 2), st.integers(1, 5),
                             st.integers(1, 5))))
    seed = draw(SEEDS)
    return {
        "shape": shape,
        "heat": _with_poison(uniform(shape, seed), draw(POISON), seed),
        "seed": seed,
        "dtype": draw(ANY_DTYPE),
        "layout": draw(st.sampled_from(LAYOUTS_4D)),
        "k": draw(mostly(st.integers(1, 5), st.one_of(st.integers(-1, 12),
                                                     st.sampled_from([2**31, 2**63 - 1, 2.0])))),
        "kernel": draw(mostly(
            st.one_of(st.sampled_from([1, 3, 5, 4095]), st.integers(4089, 4095)),
            st.one_of(
                st.integers(-3, 9),
                st.integers(4089, 4101),
                st.sampled_from([2**31 - 1, 2**31 + 1, 2**62 - 1, 2**63 - 1, 3.0, True]),
            ),
        )),
    }


def test_interest_map_beyond_the_accepted_range(target):
    @fixed_profile(beyond_budget(target, 60))
    @given(case=wide_interest_cases())
    def check(case):
        n, _, h, w = case["shape"]

        def call():
            heat = _cast(case["heat"], case["dtype"], case["layout"], target.device)
            wh = _cast(uniform((n, 2, h, w), case["seed"] + 1, 0, 6), case["dtype"],
                       case["layout"], target.device)
            offset = _cast(uniform((n, 2, h, w), case["seed"] + 2, -3, 3), case["dtype"],
                           case["layout"], target.device)
            return ops.interest_map(heat, wh, offset, k=case["k"], kernel=case["kernel"])

        expected = outcome("reference", call)
        actual = outcome(target.backend, call)
        candidates = case["shape"][1] * case["shape"][2] * case["shape"][3]
        k, kernel = case["k"], case["kernel"]
        rejected = (
            0 in case["shape"]
            or case["dtype"] in (torch.int64, torch.bool)
            or not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= candidates)
            or not (isinstance(kernel, int) and not isinstance(kernel, bool)
                    and 1 <= kernel <= ops.MAX_KERNEL and kernel % 2 == 1)
        )
        assert (expected[0] == "raised") == rejected, f"rejected={rejected}: {expected}"
        if expected[0] == "raised":
            assert actual[1:] == expected[1:]
            assert any(name in expected[2] for name in ("heat", "wh", "offset", "k", "kernel"))
            return
        assert actual[0] == "ok", actual[1:]
        for value, reference in zip(actual[1], expected[1]):
            assert torch.equal(value, reference), f"interest_map:\n{value}\n!=\n{reference}"

    check()


@st.composite
def wide_augment_cases(draw):
    shape = draw(wide_shape((st.integers(1, 2), st.integers(1, 3), st.integers(1, 5),
                             st.integers(1, 5))))
    op_ids = draw(st.lists(st.integers(-1, NUM_PRIMITIVES), min_size=0, max_size=3))
    magnitude = st.one_of(st.floats(-2.0, 3.0), st.sampled_from([float("inf"), -float("inf")]))
    magnitudes = [draw(magnitude) for _ in op_ids]
    magnitudes = [min(m, 0.0) if op == NOISE else m for op, m in zip(op_ids, magnitudes)]
    return {
        "x": normal(shape, draw(SEEDS)),
        "dtype": draw(ANY_DTYPE),
        "layout": draw(st.sampled_from(LAYOUTS_4D)),
        "op_ids": draw(st.sampled_from([list, tuple, set]))(op_ids),
        "magnitudes": torch.tensor(magnitudes, dtype=torch.float32),
        "seed": draw(SEEDS),
    }


def test_feature_augment_beyond_the_accepted_range(target):
    @fixed_profile(beyond_budget(target, 30))
    @given(case=wide_augment_cases())
    def check(case):
        def call():
            x = _cast(case["x"], case["dtype"], case["layout"], target.device)
            generator = torch.Generator().manual_seed(case["seed"])
            return ops.feature_augment(x, case["op_ids"], case["magnitudes"].to(target.device),
                                       generator)

        names = ("x", "op_ids", "magnitudes")
        rejected = (
            0 in case["x"].shape
            or case["dtype"] in (torch.int64, torch.bool)
            or isinstance(case["op_ids"], set)
            or not all(0 <= op < NUM_PRIMITIVES for op in case["op_ids"])
        )
        assert_same_outcome(target, call, names, f"feature_augment{case['op_ids']}",
                            rejected=rejected)

    check()


def test_top_class_mask_beyond_the_accepted_range(target):
    @fixed_profile(beyond_budget(target, 20))
    @given(case=wide_logit_cases(), ratio=st.sampled_from([-0.5, 0.0, 1e-9, 0.3, 1.0, 1.5,
                                                           float("nan"), "0.2"]))
    def check(case, ratio):
        def call():
            student, teacher = _wide_logits(case, target.device)
            return ops.top_class_mask(teacher, student, ratio)

        names = ("teacher_logits", "student_logits", "ratio")
        assert_same_outcome(target, call, names, "top_class_mask")

    check()
