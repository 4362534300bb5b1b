"""Regression tests for failures seen when the ops are used the way people train: autograd
called as trainers call it, values at the edges of each argument's range, torch.compile with
changing batch sizes, and the helpers of torch.func and torch.jit. Each test runs on every
backend it concerns, and compares with the reference where a value is expected."""

import pytest
import torch
from backend_matrix import (
    ALL_TARGETS,
    KERNEL_TARGETS,
    REFERENCE_TARGETS,
    assert_matches,
    target_params,
    using,
)

import sokd
from sokd import SoKDLoss, ops

SECOND_DERIVATIVE_REFUSED = "differentiable once|once_differentiable"
# The C++ kernels (csrc/cpu, csrc/cuda).
NATIVE_TARGETS = [t for t in KERNEL_TARGETS if t.backend in ("cpu", "cuda")]
CPU_NATIVE_TARGETS = [t for t in NATIVE_TARGETS if t.backend == "cpu"]


def randn(*shape, seed=0, dtype=torch.float32, device="cpu", scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(
        device=device, dtype=dtype
    )


def logit_losses(device, dtype=torch.float32):
    """Each logit loss as a function of the student logits (teacher and class data fixed)."""
    teacher = randn(6, 5, seed=1, device=device, dtype=dtype)
    target = torch.tensor([0, 4, 2, 1, 3, 0], device=device)
    return {
        "kd_loss": lambda s: ops.kd_loss(s, teacher),
        "decoupled_kd_loss": lambda s: ops.decoupled_kd_loss(s, teacher, teacher > 0),
        "dkd_loss": lambda s: ops.dkd_loss(s, teacher, target),
    }


def all_losses(device, dtype=torch.float32):
    """Every loss as a function of one differentiated input (logits or student features)."""
    teacher_feature = randn(2, 3, 4, 5, seed=2, device=device, dtype=dtype)
    mask = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(3)).to(device)
    losses = {name: (loss, (6, 5)) for name, loss in logit_losses(device, dtype).items()}
    losses["masked_feature_loss"] = (
        lambda s: ops.masked_feature_loss(s, teacher_feature, mask, "mask"),
        (2, 3, 4, 5),
    )
    return losses


LOSS_NAMES = ("kd_loss", "decoupled_kd_loss", "dkd_loss", "masked_feature_loss")


# --- autograd as trainers call it -----------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_grad_with_retain_graph_returns_fresh_tensors(target, name):
    """Two autograd.grad calls on one retained graph: writing through the first result must
    not change the second (the cpu backend used to return its saved buffer both times)."""
    loss_fn, shape = all_losses(target.device)[name]
    x = randn(*shape, seed=5, device=target.device).requires_grad_()
    with using(target.backend):
        loss = loss_fn(x)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    expected = first.clone()
    first.mul_(0).add_(123.0)  # the user's own result, theirs to modify
    (second,) = torch.autograd.grad(loss, x)
    assert second.data_ptr() != first.data_ptr()
    assert torch.equal(second, expected)


@pytest.mark.parametrize("target", **target_params(NATIVE_TARGETS))
def test_second_derivative_of_masked_feature_loss_raises(target):
    """create_graph=True gives the first derivative; differentiating it again with respect to
    student or teacher raises the documented error instead of a silent zero or an unused-input
    complaint."""
    student = randn(2, 3, 4, 5, seed=0, device=target.device).requires_grad_()
    teacher = randn(2, 3, 4, 5, seed=1, device=target.device).requires_grad_()
    mask = torch.rand(2, 4, 5).to(target.device)
    with using(target.backend):
        loss = ops.masked_feature_loss(student, teacher, mask)
    grad_student, grad_teacher = torch.autograd.grad(loss, (student, teacher), create_graph=True)
    for grad in (grad_student, grad_teacher):
        for wrt in (student, teacher):
            with pytest.raises(RuntimeError, match=SECOND_DERIVATIVE_REFUSED):
                torch.autograd.grad(grad.square().sum(), wrt, retain_graph=True)


@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_mask_and_weights_get_no_gradient_on_any_backend(target):
    """The documented contract: a mask or row weight is a constant, even when it requires
    grad; the loss requires grad only through the student (and, for features, the teacher)."""
    device = target.device
    student = randn(2, 3, 4, 5, device=device).requires_grad_()
    mask = torch.rand(2, 4, 5).to(device).requires_grad_()
    logits = randn(6, 5, device=device).requires_grad_()
    weight = torch.rand(6).to(device).requires_grad_()
    with using(target.backend):
        feature_loss = ops.masked_feature_loss(student, randn(2, 3, 4, 5, seed=1, device=device),
                                               mask, "mask")
        kd = ops.kd_loss(logits, randn(6, 5, seed=1, device=device), 4.0, weight)
        only_mask = ops.masked_feature_loss(student.detach(), student.detach() + 1, mask)
        only_weight = ops.kd_loss(logits.detach(), logits.detach() + 1, 4.0, weight)
    grads = torch.autograd.grad(feature_loss + kd, (mask, weight), allow_unused=True)
    assert grads == (None, None)
    assert not only_mask.requires_grad and not only_weight.requires_grad


@pytest.mark.parametrize("name", ("kd_loss", "decoupled_kd_loss", "dkd_loss"))
@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_logit_loss_requires_grad_only_through_the_student(target, name):
    teacher = randn(6, 5, seed=1, device=target.device).requires_grad_()
    student = randn(6, 5, device=target.device)
    target_classes = torch.tensor([0, 4, 2, 1, 3, 0], device=target.device)
    call = {
        "kd_loss": lambda: ops.kd_loss(student, teacher),
        "decoupled_kd_loss": lambda: ops.decoupled_kd_loss(student, teacher, teacher > 0),
        "dkd_loss": lambda: ops.dkd_loss(student, teacher, target_classes),
    }[name]
    with using(target.backend):
        assert not call().requires_grad


# --- values at the edges ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
@pytest.mark.parametrize("shape", ((64, 1), (3, 1, 5, 7), (2, 1, 8, 8)))
@pytest.mark.parametrize("target", **target_params(REFERENCE_TARGETS + NATIVE_TARGETS))
def test_kd_with_one_class_is_exactly_zero(target, shape, dtype):
    """With K = 1 both softmaxes are 1: the KL and its gradient are exactly 0."""
    student = randn(*shape, scale=30.0, dtype=dtype, device=target.device).requires_grad_()
    teacher = randn(*shape, seed=1, scale=30.0, dtype=dtype, device=target.device)
    for temperature in (0.1, 4.0, 7.3):
        with using(target.backend):
            loss = ops.kd_loss(student, teacher, temperature)
        (grad,) = torch.autograd.grad(loss, student)
        assert loss.item() == 0.0, temperature
        assert not grad.any(), temperature


@pytest.mark.parametrize("scale", (1e-30, 1e-23, 1e-22, 1e-10, 1.0, 1e10, 1e19, 1e30))
@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_mask_normalised_loss_does_not_depend_on_the_mask_scale(target, scale):
    device = target.device
    student = randn(2, 3, 4, 5, device=device).requires_grad_()
    teacher = randn(2, 3, 4, 5, seed=1, device=device)
    shape_of_mask = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(4)) + 0.5
    with using(target.backend):
        unit = ops.masked_feature_loss(student, teacher, shape_of_mask.to(device), "mask")
        scaled = ops.masked_feature_loss(
            student, teacher, (shape_of_mask * scale).to(device), "mask"
        )
    (grad_unit,) = torch.autograd.grad(unit, student)
    (grad_scaled,) = torch.autograd.grad(scaled, student)
    torch.testing.assert_close(scaled, unit, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_scaled, grad_unit, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_negative_row_weights_are_rejected(target):
    logits = randn(4, 5, device=target.device)
    with using(target.backend):
        for weight in ((1.0, -1.0, 1.0, -1.0), (0.5, 0.5, -0.2, 0.0)):
            with pytest.raises(ValueError, match="weight"):
                ops.kd_loss(logits, logits + 1, 4.0, torch.tensor(weight, device=target.device))


@pytest.mark.parametrize("temperature", (1e-30, 1e-3, 1e4, 1e30))
@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_temperature_outside_the_documented_range_is_rejected(target, temperature):
    logits = randn(4, 5, device=target.device)
    with using(target.backend):
        for call in (
            lambda: ops.kd_loss(logits, logits, temperature),
            lambda: ops.decoupled_kd_loss(logits, logits, logits > 0, temperature=temperature),
            lambda: ops.dkd_loss(logits, logits, torch.zeros(4, dtype=torch.long),
                                 temperature=temperature),
        ):
            with pytest.raises(ValueError, match="temperature"):
                call()
    with pytest.raises(ValueError, match="temperature"):
        SoKDLoss(3, 3, temperature=temperature)


@pytest.mark.parametrize("temperature", ops.TEMPERATURE_RANGE)
@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_temperatures_at_the_range_ends_match_the_reference(target, temperature):
    # float64: at T = 1e3 the KL is 1e-6 of its terms, below float32's resolution of them.
    student = randn(4, 5, scale=3.0, device=target.device, dtype=torch.float64)
    teacher = randn(4, 5, seed=1, scale=3.0, device=target.device, dtype=torch.float64)
    with using("reference"):
        expected = ops.kd_loss(student, teacher, temperature)
    with using(target.backend):
        actual = ops.kd_loss(student, teacher, temperature)
    assert_matches(actual, expected, "kd_loss")


@pytest.mark.parametrize("kernel", (2**12 + 1, 2**31 - 1, 2**31 + 1, 2**62 - 1))
@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_absurd_interest_kernel_raises_value_error(target, kernel):
    """A kernel past MAX_KERNEL raises before any backend runs (the cpu backend used to die of
    SIGFPE at 2^62 - 1)."""
    device = target.device
    heat, wh, offset = randn(1, 1, 4, 4, device=device), randn(1, 2, 4, 4, device=device), \
        randn(1, 2, 4, 4, device=device)
    with using(target.backend), pytest.raises(ValueError, match="kernel"):
        ops.interest_map(heat, wh, offset, k=2, kernel=kernel)


@pytest.mark.parametrize("target", **target_params(CPU_NATIVE_TARGETS))
def test_native_interest_op_checks_the_kernel_bound(target):
    """A direct call of the native op cannot reach the kernel with an absurd window either."""
    heat, wh, offset = randn(1, 1, 4, 4), randn(1, 2, 4, 4), randn(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="kernel"):
        torch.ops.sokd.interest_map(heat, wh, offset, 2, 2**62 - 1)


@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_largest_kernel_matches_the_reference(target):
    device = target.device
    maps = randn(1, 1, 5, 6, device=device), randn(1, 2, 5, 6, device=device).abs() * 3, \
        randn(1, 2, 5, 6, seed=3, device=device)
    with using("reference"):
        expected = ops.interest_map(*maps, k=3, kernel=ops.MAX_KERNEL)
    with using(target.backend):
        actual = ops.interest_map(*maps, k=3, kernel=ops.MAX_KERNEL)
    for got, want, what in zip(actual, expected, ("count", "boxes", "scores")):
        assert_matches(got, want, what)


# --- validation gaps -------------------------------------------------------------------------


def test_sokd_check_finite_scans_the_logits():
    criterion = SoKDLoss(3, 3, k=2, logit_loss="kd", check_finite=True)
    feature = randn(2, 3, 4, 4)
    good = randn(2, 5)
    for bad_name in ("student_logits", "teacher_logits"):
        bad = good.clone()
        bad[1, 2] = float("nan")
        logits = {"student_logits": good, "teacher_logits": good, bad_name: bad}
        with pytest.raises(ValueError, match="logits"):
            criterion(feature, feature + 1, **logits)


@pytest.mark.parametrize("logit_loss", ("kd", "dkd", "masked"))
def test_sokd_list_as_student_logits_is_a_type_error(logit_loss):
    criterion = SoKDLoss(3, 3, k=2, logit_loss=logit_loss)
    feature = randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="student_logits"):
        criterion(feature, feature + 1, [[0.0] * 5] * 2, randn(2, 5), torch.tensor([0, 1]))


@pytest.mark.parametrize("op_ids", ({1, 2}, frozenset({3}), {1: 0, 2: 0}))
def test_unordered_op_ids_are_rejected(op_ids):
    with pytest.raises(TypeError, match="op_ids"):
        ops.feature_augment(randn(2, 3, 4, 4), op_ids, torch.full((len(op_ids),), 0.5))


@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_channel_ops_under_float64_default_dtype_match_the_reference(target):
    from sokd.augment_ops import CHANNEL_DROP, CHANNEL_SHUFFLE, CUTOUT

    x = randn(2, 3, 4, 4, device=target.device)
    magnitudes = torch.full((3,), 0.7, device=target.device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        results = {}
        for backend in ("reference", target.backend):
            with using(backend):
                generator = torch.Generator().manual_seed(9)
                results[backend] = ops.feature_augment(
                    x, [CHANNEL_DROP, CHANNEL_SHUFFLE, CUTOUT], magnitudes, generator
                )
    finally:
        torch.set_default_dtype(previous)
    assert_matches(results[target.backend], results["reference"], "feature_augment")


@pytest.mark.parametrize("target", **target_params(CPU_NATIVE_TARGETS))
def test_large_cached_outputs_are_resizable(target):
    """Outputs of 16 MiB or more come from the block cache; they resize like any tensor."""
    student = randn(1, 64, 256, 256).requires_grad_()
    with using("cpu"):
        loss = ops.masked_feature_loss(student, torch.zeros_like(student))
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.nbytes >= 16 << 20
    expected = grad[0, 0, 0, :10].clone()
    grad.resize_(grad.numel() + 1024)  # larger: needs new memory
    assert torch.equal(grad[:10], expected)
    grad.resize_(3)
    out = torch.empty(0)
    torch.add(grad, 1.0, out=out)
    with using("cpu"):
        augmented = ops.feature_augment(student.detach(), [0], torch.tensor([0.5]))
    torch.mul(student.detach()[:, :1], 2.0, out=augmented)  # out= of another size resizes it
    assert augmented.shape == (1, 1, 256, 256)
    sokd.empty_cache()


# --- torch.func and torch.jit ----------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_torch_func_grad_and_vmap_match_the_reference(target, name):
    """Under torch.func transforms every backend computes with the reference's PyTorch ops,
    so grad, vmap and their compositions work and agree with it."""
    loss_fn, shape = all_losses(target.device, torch.float64)[name]
    x = randn(*shape, seed=6, device=target.device, dtype=torch.float64)
    batch = torch.stack([x, x * 0.5, x + 1])
    with using("reference"):
        expected_loss = loss_fn(x)
        (expected_grad,) = torch.autograd.grad(loss_fn(x.requires_grad_()), x)
        x = x.detach()
        expected_batch = torch.stack([loss_fn(row) for row in batch])
    with using(target.backend):
        grad = torch.func.grad(loss_fn)(x)
        value = torch.func.vmap(loss_fn)(batch)
        per_sample = torch.func.vmap(torch.func.grad(loss_fn))(batch)
    assert_matches(grad, expected_grad, f"{name} func.grad")
    assert_matches(value, expected_batch, f"{name} vmap")
    assert per_sample.shape == batch.shape
    assert_matches(per_sample[0], expected_grad, f"{name} vmap(grad)")
    assert expected_loss.isfinite()


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_jit_trace_without_grad_still_backpropagates(target, name):
    """torch.jit.trace replays the op with the arguments seen while tracing: traced on inputs
    that need no gradient, the graph must still give the gradient later."""
    loss_fn, shape = all_losses(target.device)[name]
    example = randn(*shape, seed=7, device=target.device)
    with using(target.backend):
        traced = torch.jit.trace(loss_fn, (example,), check_trace=False)
        x = randn(*shape, seed=8, device=target.device).requires_grad_()
        loss = traced(x)
    loss.backward()
    _assert_matches_reference(loss_fn, x, loss, f"{name} traced")


def _assert_matches_reference(loss_fn, x, loss, label):
    """`loss` and the gradient it left in x.grad against loss_fn on the reference backend."""
    with using("reference"):
        reference_x = x.detach().clone().requires_grad_()
        expected = loss_fn(reference_x)
        expected.backward()
    assert_matches(loss, expected, f"{label} loss")
    assert_matches(x.grad, reference_x.grad, f"{label} gradient")


# --- torch.compile ---------------------------------------------------------------------------


def _fresh_compile(target, fn, **options):
    """torch.compile from a clean cache. The Triton interpreter cannot run under AOTAutograd's
    fake tensors, so interpreted Triton compiles with Dynamo alone."""
    torch._dynamo.reset()
    if target.interpreted:
        options["backend"] = "eager"
    return torch.compile(fn, **options)


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_compiled_loss_backward_with_a_smaller_last_batch(target, name):
    """Automatic dynamic shapes: the second batch size recompiles with symbolic sizes, and the
    backward of that graph must run (the C++ autograd asked for a concrete numel)."""
    teacher_feature = randn(4, 3, 4, 5, seed=2, device=target.device)
    teacher = randn(8, 5, seed=1, device=target.device)
    target_classes = torch.arange(8, device=target.device) % 5

    def loss_fn(x):
        n = x.shape[0]
        if name == "masked_feature_loss":
            return ops.masked_feature_loss(x, teacher_feature[:n])
        if name == "kd_loss":
            return ops.kd_loss(x, teacher[:n])
        if name == "decoupled_kd_loss":
            return ops.decoupled_kd_loss(x, teacher[:n], teacher[:n] > 0)
        return ops.dkd_loss(x, teacher[:n], target_classes[:n])

    full_shape = (4, 3, 4, 5) if name == "masked_feature_loss" else (8, 5)
    with using(target.backend):
        compiled = _fresh_compile(target, loss_fn)
        for n in (full_shape[0], full_shape[0] - 1, full_shape[0] - 2):
            x = randn(n, *full_shape[1:], seed=n, device=target.device).requires_grad_()
            loss = compiled(x)
            loss.backward()
            _assert_matches_reference(loss_fn, x, loss, f"{name} n={n}")


@pytest.mark.slow
@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_dkd_loss_compiles_with_fullgraph(target):
    teacher = randn(8, 5, seed=1, device=target.device)
    classes = torch.arange(8, device=target.device) % 5
    with using(target.backend):
        compiled = _fresh_compile(
            target, lambda s: ops.dkd_loss(s, teacher, classes), fullgraph=True
        )
        student = randn(8, 5, device=target.device).requires_grad_()
        loss = compiled(student)
        loss.backward()
        with using("reference"):
            expected = ops.dkd_loss(student.detach(), teacher, classes)
        assert_matches(loss, expected, "dkd_loss")
        # The range check is part of the graph: a bad target still raises.
        with pytest.raises(RuntimeError, match="target"):
            compiled_bad = _fresh_compile(
                target, lambda s: ops.dkd_loss(s, teacher, classes + 5), fullgraph=True
            )
            compiled_bad(student)


@pytest.mark.slow
@pytest.mark.parametrize("use_generator", (False, True))
@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_compiled_random_augmentation_with_a_second_batch_size(target, use_generator):
    from sokd.augment_ops import CHANNEL_DROP, CHANNEL_SHUFFLE, CUTOUT

    op_ids = [CHANNEL_SHUFFLE, CHANNEL_DROP, CUTOUT]
    magnitudes = torch.full((3,), 0.6, device=target.device)

    def augment(x, generator):
        return ops.feature_augment(x, op_ids, magnitudes, generator)

    # Inductor's own random numbers differ from eager ones unless told to fall back to them.
    with using(target.backend), torch._inductor.config.patch(fallback_random=True):
        compiled = _fresh_compile(target, augment)
        for n in (4, 3, 2):
            x = randn(n, 3, 5, 5, seed=n, device=target.device)
            generator = torch.Generator().manual_seed(n) if use_generator else None
            if not use_generator:
                torch.manual_seed(n)
            out = compiled(x, generator)
            generator = torch.Generator().manual_seed(n) if use_generator else None
            if not use_generator:
                torch.manual_seed(n)
            with using("reference"):
                expected = augment(x, generator)
            assert_matches(out, expected, f"feature_augment n={n}")
