"""sokd.logit_distill_loss and sokd.fused_linear_distill_loss (docs/algorithm.md §7): the
reference against hand-derived values and float64 gradcheck, every backend against the
reference, bad input, torch.compile, and data-parallel training (opcheck: test_opcheck.py)."""

import os
import math
import socket
from datetime import timedelta

import pytest
import torch

import sokd
from sokd.ops import fused_linear_distill_loss, logit_distill_loss
from sokd import reference

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
native = pytest.mark.skipif(
    "cpu" not in sokd.available_backends(), reason="sokd._C was not built"
)


def _loss_and_grad(backend, student, *args, **kwargs):
    sokd.set_backend(backend)
    student = student.detach().clone().requires_grad_(True)
    loss = logit_distill_loss(student, *args, **kwargs)
    # A fixed random grad_output for reduction="none", the usual seed of 1 otherwise.
    seed = torch.randn(loss.shape, generator=torch.Generator().manual_seed(5)).to(loss.dtype)
    if loss.dim() == 0:
        seed = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, student, seed)
    return loss.detach(), grad


def _case(rows=6, vocab=37, seed=0, dtype=torch.float32, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=generator) * scale).to(dtype)
    teacher = (torch.randn(rows, vocab, generator=generator) * scale).to(dtype)
    return student, teacher, generator


def _topk(teacher, k, temperature):
    logprobs, ids = torch.log_softmax(teacher.double() / temperature, -1).topk(k, dim=-1)
    return logprobs.float(), ids


# --- the reference against values derived by hand -------------------------------------------

P2 = (0.75, 0.25)  # softmax of teacher logits (log 3, 0)
Q2 = (0.5, 0.5)  # softmax of student logits (0, 0)
HAND = {
    "forward_kl": sum(p * math.log(p / q) for p, q in zip(P2, Q2)),
    "reverse_kl": sum(q * math.log(q / p) for p, q in zip(P2, Q2)),
    "jsd": sum(
        0.5 * p * math.log(p / (0.5 * p + 0.5 * q)) + 0.5 * q * math.log(q / (0.5 * p + 0.5 * q))
        for p, q in zip(P2, Q2)
    ),
}


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_reference_matches_hand_values(divergence, temperature):
    # Teacher logits T * (log 3, 0) give P = (3/4, 1/4) at every temperature.
    teacher = torch.tensor([[temperature * math.log(3.0), 0.0]], dtype=torch.float64)
    student = torch.zeros(1, 2, dtype=torch.float64)
    loss = reference.logit_distill_loss(
        student, teacher, divergence=divergence, temperature=temperature
    )
    assert loss.item() == pytest.approx(HAND[divergence], rel=1e-12)


def test_reference_gradient_of_forward_kl_is_q_minus_p_over_t():
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]], dtype=torch.float64)
    reference.logit_distill_loss(student, teacher, temperature=2.0).backward()
    expected = torch.tensor([[0.5 - 0.75, 0.5 - 0.25]], dtype=torch.float64) / 2
    torch.testing.assert_close(student.grad, expected)


def test_reference_topk_tail_bucket_by_hand():
    # Q = 1/3 each; the teacher keeps id 2 with P = 0.6, leaving a tail of 0.4 against 2/3.
    student = torch.zeros(1, 3, dtype=torch.float64)
    topk = (torch.tensor([[math.log(0.6)]], dtype=torch.float64), torch.tensor([[2]]))
    loss = reference.logit_distill_loss(student, teacher_topk=topk)
    expected = 0.6 * math.log(0.6 * 3) + 0.4 * math.log(0.4 / (2 / 3))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_reference_ignore_index_num_items_and_empty_mean():
    student, teacher, _ = _case(rows=3, dtype=torch.float64)
    rows = reference.logit_distill_loss(student, teacher, reduction="none")
    labels = torch.tensor([5, -100, 7])
    mean = reference.logit_distill_loss(student, teacher, labels=labels)
    assert mean.item() == pytest.approx((rows[0] + rows[2]).item() / 2, rel=1e-12)
    summed = reference.logit_distill_loss(student, teacher, labels=labels, num_items=10)
    assert summed.item() == pytest.approx((rows[0] + rows[2]).item() / 10, rel=1e-12)
    none = reference.logit_distill_loss(student, teacher, labels=labels, reduction="none")
    assert none[1].item() == 0.0 and none[0].item() == rows[0].item()


def test_reference_masked_vocabulary_equals_the_shorter_row():
    student, teacher, _ = _case(rows=4, vocab=9, dtype=torch.float64)
    for divergence in DIVERGENCES:
        masked_s = torch.cat([student, torch.full((4, 2), -math.inf, dtype=torch.float64)], 1)
        masked_t = torch.cat([teacher, torch.full((4, 2), -math.inf, dtype=torch.float64)], 1)
        short = reference.logit_distill_loss(student, teacher, divergence=divergence)
        long = reference.logit_distill_loss(masked_s, masked_t, divergence=divergence)
        assert long.item() == pytest.approx(short.item(), rel=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("topk", (False, True))
def test_reference_gradcheck_float64(divergence, topk):
    student, teacher, _ = _case(rows=3, vocab=7, dtype=torch.float64, scale=1.0)
    student.requires_grad_(True)
    labels = torch.tensor([1, -100, 2])
    if topk:
        logprobs, ids = torch.log_softmax(teacher / 2.0, -1).topk(3, -1)

        def fn(s):
            return reference.logit_distill_loss(
                s, divergence=divergence, temperature=2.0, labels=labels,
                teacher_topk=(logprobs, ids),
            )
    else:

        def fn(s):
            return reference.logit_distill_loss(
                s, teacher, divergence=divergence, temperature=2.0, labels=labels
            )

    assert torch.autograd.gradcheck(fn, (student,))
    assert torch.autograd.gradgradcheck(fn, (student,))


# --- every backend against the reference ---------------------------------------------------


def _compare(backend, student, *args, atol=2e-5, rtol=2e-5, **kwargs):
    got_loss, got_grad = _loss_and_grad(backend, student, *args, **kwargs)
    want_loss, want_grad = _loss_and_grad("reference", student, *args, **kwargs)
    torch.testing.assert_close(got_loss, want_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), atol=atol, rtol=rtol)


@native
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", (0.5, 1.0, 4.0))
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_cpu_matches_reference_dense(divergence, temperature, reduction):
    student, teacher, _ = _case(rows=7, vocab=45)
    labels = torch.tensor([3, -100, 4, 5, -100, 1, 0])
    _compare("cpu", student, teacher, divergence=divergence, temperature=temperature,
             labels=labels, reduction=reduction, beta=0.3)


@native
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", (0.5, 1.0, 4.0))
@pytest.mark.parametrize("k", (1, 8, 64))
def test_cpu_matches_reference_topk(divergence, temperature, k):
    student, teacher, _ = _case(rows=5, vocab=100, scale=2.0)
    topk = _topk(teacher, k, temperature)
    labels = torch.tensor([3, 4, -100, 1, 0])
    _compare("cpu", student, divergence=divergence, temperature=temperature, labels=labels,
             teacher_topk=topk, beta=0.7)


@native
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cpu_num_items_and_vocab_cut_and_leading_dims(divergence):
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 3, 40, generator=generator) * 2
    teacher = torch.randn(2, 3, 45, generator=generator) * 2
    labels = torch.tensor([[1, -100, 2], [-100, 5, 6]])
    _compare("cpu", student, teacher, divergence=divergence, labels=labels, num_items=11,
             vocab_size=37)
    _compare("cpu", student, teacher, divergence=divergence, labels=labels,
             num_items=torch.tensor(7), vocab_size=40, reduction="none")


@native
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cpu_rows_of_length_one_and_masked_vocabulary(divergence):
    student, teacher, _ = _case(rows=4, vocab=1)
    _compare("cpu", student, teacher, divergence=divergence)
    student, teacher, generator = _case(rows=6, vocab=33)
    # Masked entries: -inf in both models, in the student only where the teacher puts no mass
    # either (a finite student against a -inf teacher is infinite for reverse KL).
    masked = torch.rand(6, 33, generator=generator) < 0.3
    masked[:, 0] = False
    student = student.masked_fill(masked, -math.inf)
    teacher = teacher.masked_fill(masked, -math.inf)
    _compare("cpu", student, teacher, divergence=divergence)
    topk = _topk(teacher, 4, 1.0)
    _compare("cpu", student, divergence=divergence, teacher_topk=topk)


@native
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cpu_half_inputs_match_reference(dtype, divergence):
    student, teacher, _ = _case(rows=5, vocab=70, dtype=dtype)
    loss, grad = _loss_and_grad("cpu", student, teacher, divergence=divergence)
    want_loss, want_grad = _loss_and_grad("reference", student, teacher, divergence=divergence)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    # Both round a float32 gradient to the half type once.
    torch.testing.assert_close(grad.float(), want_grad.float(), atol=1e-4, rtol=1e-2)


@native
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cpu_bf16_gradient_error_is_one_rounding(divergence):
    student, teacher, _ = _case(rows=8, vocab=300, dtype=torch.bfloat16)
    _, grad = _loss_and_grad("cpu", student, teacher, divergence=divergence)
    _, exact = _loss_and_grad("reference", student.double(), teacher.double(),
                              divergence=divergence)
    rounded_once = exact.float().to(torch.bfloat16).double()
    error = (grad.double() - exact).abs().max().item()
    rounding = (rounded_once - exact).abs().max().item()
    assert error <= rounding * 1.01 + 1e-9


@native
def test_cpu_mean_without_counted_rows_is_zero_with_zero_grad():
    student, teacher, _ = _case(rows=3)
    labels = torch.full((3,), -100)
    for backend in ("cpu", "reference"):
        loss, grad = _loss_and_grad(backend, student, teacher, labels=labels)
        assert loss.item() == 0.0 and not torch.isnan(loss)
        assert torch.count_nonzero(grad) == 0


@native
def test_cpu_gradient_only_for_student_and_once_differentiable():
    student, teacher, _ = _case(rows=2)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    sokd.set_backend("cpu")
    loss = logit_distill_loss(student, teacher, divergence="jsd")
    (grad,) = torch.autograd.grad(loss, student, create_graph=True)
    assert teacher.grad is None
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad.sum().backward()


@native
def test_op_without_saved_gradient_refuses_backward():
    student, teacher, _ = _case(rows=2)
    student.requires_grad_(True)
    loss, grad = torch.ops.sokd.logit_distill_loss(
        student, teacher, None, None, None, "forward_kl", 0.5, 1.0, -100, "mean", None, 37, False
    )
    assert grad.numel() == 0
    with pytest.raises(RuntimeError, match="with_grad=False"):
        loss.backward()


@native
def test_cpu_result_does_not_depend_on_threads():
    student, teacher, _ = _case(rows=64, vocab=500)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _loss_and_grad("cpu", student, teacher, divergence="jsd")
        torch.set_num_threads(2)
        two = _loss_and_grad("cpu", student, teacher, divergence="jsd")
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_modules_match_functions():
    student, teacher, _ = _case(rows=4)
    module = sokd.LogitDistillLoss(divergence="reverse_kl", temperature=2.0)
    expected = logit_distill_loss(student, teacher, divergence="reverse_kl", temperature=2.0)
    torch.testing.assert_close(module(student, teacher), expected)
    assert "reverse_kl" in repr(module)


# --- the Triton kernel through its launcher (interpreter on the CPU) ------------------------


def _launch(student, teacher, labels=None, topk=None, **options):
    launcher = pytest.importorskip("sokd.kernels.logit_distill_loss")
    rows, width = student.shape
    num_items = options.get("num_items")
    if num_items is not None:
        num_items = torch.tensor(float(num_items), dtype=torch.float64)
    return launcher.logit_distill_loss(
        student, teacher, None if topk is None else topk[0], None if topk is None else topk[1],
        labels, divergence=options.get("divergence", "forward_kl"),
        beta=options.get("beta", 0.5), temperature=options.get("temperature", 1.0),
        ignore_index=-100, reduction=options.get("reduction", "mean"),
        num_items=num_items, vocab_size=options.get("vocab_size", width),
        with_grad=True,
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", (0.5, 4.0))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_triton_launcher_matches_reference(divergence, temperature, reduction, monkeypatch):
    launcher = pytest.importorskip("sokd.kernels.logit_distill_loss")
    monkeypatch.setattr(launcher, "MAX_BLOCK_V", 8)  # several vocabulary blocks per row
    student, teacher, _ = _case(rows=4, vocab=21)
    labels = torch.tensor([1, -100, 2, 3])
    loss, grad = _launch(student, teacher, labels, divergence=divergence,
                         temperature=temperature, reduction=reduction, vocab_size=19)
    sokd.set_backend("reference")
    s = student.clone().requires_grad_(True)
    want = logit_distill_loss(s, teacher, divergence=divergence, temperature=temperature,
                              labels=labels, reduction=reduction, vocab_size=19)
    (want_grad,) = torch.autograd.grad(want.sum(), s)
    torch.testing.assert_close(loss, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad, want_grad, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("k", (1, 8, 64))
def test_triton_launcher_topk_matches_reference(divergence, k, monkeypatch):
    launcher = pytest.importorskip("sokd.kernels.logit_distill_loss")
    monkeypatch.setattr(launcher, "MAX_BLOCK_V", 32)
    student, teacher, _ = _case(rows=3, vocab=70, scale=2.0)
    topk = _topk(teacher, k, 1.0)
    loss, grad = _launch(student, None, topk=topk, divergence=divergence, num_items=5)
    sokd.set_backend("reference")
    s = student.clone().requires_grad_(True)
    want = logit_distill_loss(s, divergence=divergence, teacher_topk=topk, num_items=5)
    (want_grad,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(loss, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad, want_grad, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_triton_launcher_half_inputs_and_masked(dtype):
    """Half inputs widen to float32; -inf entries (a masked vocabulary) add nothing."""
    student, teacher, generator = _case(rows=3, vocab=16, dtype=dtype)
    masked = torch.rand(3, 16, generator=generator) < 0.3
    masked[:, 0] = False
    student = student.masked_fill(masked, -math.inf)
    teacher = teacher.masked_fill(masked, -math.inf)
    loss, grad = _launch(student, teacher, divergence="jsd")
    sokd.set_backend("reference")
    s = student.clone().requires_grad_(True)
    want = logit_distill_loss(s, teacher, divergence="jsd")
    (want_grad,) = torch.autograd.grad(want, s)
    assert grad.dtype == dtype
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), want_grad.float(), atol=1e-4, rtol=1e-2)


def test_triton_launcher_rows_of_length_one():
    student, teacher, _ = _case(rows=3, vocab=1)
    for divergence in DIVERGENCES:
        loss, grad = _launch(student, teacher, divergence=divergence)
        # The KLs' loss is (v - u) - v + u here: 0 up to the rounding of the logits.
        assert abs(loss.item()) < 1e-6 and grad.abs().max().item() < 1e-6


# --- the Triton kernel through the public functions (the same op and autograd) -----------


@pytest.fixture
def counted_triton_launches(monkeypatch):
    """Runs the Triton backend (interpreter on CPU tensors) with small vocabulary blocks and
    counts the launches of the logit kernel, so that a test knows the launcher ran below the
    op rather than the C++ CPU kernel."""
    kernels = pytest.importorskip("sokd.kernels")
    if "triton" not in sokd.available_backends() or "cpu" not in sokd.available_backends():
        pytest.skip("the Triton backend runs on CPU tensors only through sokd._C's router")
    launcher_module = pytest.importorskip("sokd.kernels.logit_distill_loss")
    monkeypatch.setattr(launcher_module, "MAX_BLOCK_V", 8)
    launcher = kernels.LAUNCHERS["logit_distill_loss"]
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return launcher(*args)

    monkeypatch.setitem(kernels.LAUNCHERS, "logit_distill_loss", counted)
    return calls


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_triton_backend_matches_reference(divergence, reduction, counted_triton_launches):
    student, teacher, _ = _case(rows=4, vocab=21)
    labels = torch.tensor([1, -100, 2, 3])
    options = dict(divergence=divergence, temperature=2.0, labels=labels, reduction=reduction,
                   vocab_size=19)
    got = _loss_and_grad("triton", student, teacher, **options)
    assert len(counted_triton_launches) == 1
    want = _loss_and_grad("reference", student, teacher, **options)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_triton_backend_fused_linear_matches_unfused(reduction, counted_triton_launches):
    """The composite op runs one row kernel launch per chunk; for "none" backward reruns the
    chunks with each row's grad_output."""
    tensors = _linear_case(teacher_vocab=26)
    fused, fused_grads, unfused, unfused_grads = _fused_and_unfused(
        "triton", tensors, chunk_size=4, divergence="jsd", reduction=reduction, vocab_size=23,
    )
    assert len(counted_triton_launches) == (6 if reduction == "none" else 3)
    torch.testing.assert_close(fused, unfused, atol=2e-5, rtol=2e-5)
    for got, want in zip(fused_grads, unfused_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


# --- torch.func and second derivatives ------------------------------------------------------


@native
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_torch_func_grad_and_vmap_match_the_reference(divergence):
    """Under torch.func every backend computes with the reference's PyTorch ops, as for the
    other sokd ops, so grad and vmap work and equal the reference's eager gradient."""
    student, teacher, _ = _case(rows=3, vocab=11)
    sokd.set_backend("cpu")

    def loss_fn(logits, teacher_logits):
        return logit_distill_loss(logits, teacher_logits, divergence=divergence)

    grad = torch.func.grad(loss_fn)(student, teacher)
    per_row = torch.func.vmap(torch.func.grad(loss_fn))(student[:, None], teacher[:, None])
    want = _loss_and_grad("reference", student, teacher, divergence=divergence)[1]
    torch.testing.assert_close(grad, want)
    rows = torch.stack([_loss_and_grad("reference", student[i:i + 1], teacher[i:i + 1],
                                       divergence=divergence)[1] for i in range(3)])
    torch.testing.assert_close(per_row, rows)


@native
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_fused_linear_is_differentiable_once(reduction):
    tensors = {k: v.clone().requires_grad_(k.startswith("student"))
               for k, v in _linear_case(rows=5).items()}
    sokd.set_backend("cpu")
    loss = fused_linear_distill_loss(**tensors, chunk_size=2, reduction=reduction)
    grads = torch.autograd.grad(loss.sum(), (tensors["student_hidden"], tensors["student_weight"]),
                                create_graph=True)
    for grad in grads:
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(grad.sum(), tensors["student_bias"], retain_graph=True)


# --- bad input -----------------------------------------------------------------------------


def _bad(match, error, *args, **kwargs):
    with pytest.raises(error, match=match):
        logit_distill_loss(*args, **kwargs)


def test_bad_input_names_the_argument():
    s, t, _ = _case(rows=3, vocab=10)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    logprobs = torch.full((3, 2), -1.0)
    _bad("teacher_logits", ValueError, s, t[:2])
    _bad("student_logits has 10 columns but teacher_logits has 12", ValueError, s,
         torch.randn(3, 12))
    _bad("vocab_size", ValueError, s, t, vocab_size=11)
    _bad("labels", ValueError, s, t, labels=torch.zeros(4, dtype=torch.long))
    _bad("labels", TypeError, s, t, labels=torch.zeros(3))
    _bad("num_items", ValueError, s, t, num_items=-1)
    _bad("num_items", ValueError, s, t, num_items=torch.tensor(-2.0))
    _bad("temperature", ValueError, s, t, temperature=0.0)
    _bad("temperature", ValueError, s, t, temperature=-1)
    _bad("beta", ValueError, s, t, divergence="jsd", beta=1.0)
    _bad("beta", ValueError, s, t, beta=0.0)
    _bad("divergence", ValueError, s, t, divergence="kl")
    _bad("reduction", ValueError, s, t, reduction="avg")
    _bad("teacher_topk indices", TypeError, s, teacher_topk=(logprobs, ids.float()))
    _bad("repeat", ValueError, s, teacher_topk=(logprobs, torch.tensor([[0, 0], [1, 2], [3, 4]])))
    _bad(r"\[0, 9\]", ValueError, s, teacher_topk=(logprobs, ids + 5))
    _bad("<= 0", ValueError, s, teacher_topk=(logprobs + 1.5, ids))
    _bad("teacher_topk logprobs", ValueError, s, teacher_topk=(logprobs[:2], ids[:2]))
    _bad("exactly one", ValueError, s)
    _bad("exactly one", ValueError, s, t, teacher_topk=(logprobs, ids))
    _bad("dtype", TypeError, s, t.double())
    _bad("student_logits", TypeError, s.long(), t)


def test_fused_linear_bad_input_names_the_argument():
    h, w = torch.randn(4, 6), torch.randn(10, 6)
    with pytest.raises(ValueError, match="student_weight"):
        fused_linear_distill_loss(h, torch.randn(10, 5), h, w)
    with pytest.raises(ValueError, match="teacher_hidden"):
        fused_linear_distill_loss(h, w, h[:3], w)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_distill_loss(h, w, h, w, chunk_size=0)
    with pytest.raises(ValueError, match="10 columns but teacher_logits has 12"):
        fused_linear_distill_loss(h, w, h, torch.randn(12, 6))


def test_named_backends_that_cannot_run_raise(monkeypatch):
    s, t, _ = _case(rows=2)
    sokd.set_backend("cuda")
    with pytest.raises(ValueError, match="'cuda' has no logit_distill_loss kernel.*triton"):
        logit_distill_loss(s, t)
    with pytest.raises(ValueError, match="'cuda' has no fused_linear_distill_loss kernel"):
        fused_linear_distill_loss(**_linear_case(rows=2))
    monkeypatch.delenv("TRITON_INTERPRET")
    sokd.set_backend("triton")
    with pytest.raises(ValueError, match="cannot run logit_distill_loss on cpu tensors"):
        logit_distill_loss(s, t)


# --- torch.compile -------------------------------------------------------------------------


@native
@pytest.mark.slow
@pytest.mark.parametrize("topk", (False, True))
def test_compile_fullgraph_dynamic_matches_eager(topk):
    sokd.set_backend("cpu")

    def step(student, teacher, labels):
        if topk:
            return logit_distill_loss(student, teacher_topk=teacher, labels=labels,
                                      divergence="jsd")
        return logit_distill_loss(student, teacher, labels=labels, divergence="jsd")

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for rows in (5, 9):
        student, teacher, _ = _case(rows=rows, vocab=30)
        labels = torch.arange(rows)
        labels[1] = -100
        target = _topk(teacher, 4, 1.0) if topk else teacher
        results = []
        for fn in (step, compiled):
            s = student.clone().requires_grad_(True)
            loss = fn(s, target, labels)
            loss.backward()
            results.append((loss.detach(), s.grad))
        torch.testing.assert_close(results[1][0], results[0][0])
        torch.testing.assert_close(results[1][1], results[0][1])


# --- the fused LM head ---------------------------------------------------------------------


def _linear_case(rows=10, hidden=6, vocab=23, teacher_vocab=None, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "student_hidden": torch.randn(rows, hidden, generator=g),
        "student_weight": torch.randn(vocab, hidden, generator=g),
        "teacher_hidden": torch.randn(rows, hidden + 2, generator=g),
        "teacher_weight": torch.randn(teacher_vocab or vocab, hidden + 2, generator=g),
    }
    if bias:
        tensors["student_bias"] = torch.randn(vocab, generator=g)
        tensors["teacher_bias"] = torch.randn(teacher_vocab or vocab, generator=g)
    return tensors


def _fused_and_unfused(backend, tensors, **options):
    sokd.set_backend(backend)
    student = {k: v.clone().requires_grad_(True) for k, v in tensors.items()
               if k.startswith("student")}
    teacher = {k: v.clone().requires_grad_(True) for k, v in tensors.items()
               if k.startswith("teacher")}
    fused = fused_linear_distill_loss(**student, **teacher, **options)
    seed = torch.randn_like(fused) if fused.dim() else torch.ones_like(fused)
    fused.backward(seed)
    fused_grads = [student[k].grad for k in sorted(student)]
    assert all(v.grad is None for v in teacher.values())

    sokd.set_backend("reference")
    student = {k: v.clone().requires_grad_(True) for k, v in tensors.items()
               if k.startswith("student")}
    s_logits = student["student_hidden"] @ student["student_weight"].t()
    t_logits = tensors["teacher_hidden"] @ tensors["teacher_weight"].t()
    if "student_bias" in student:
        s_logits = s_logits + student["student_bias"]
        t_logits = t_logits + tensors["teacher_bias"]
    options = {k: v for k, v in options.items() if k != "chunk_size"}
    unfused = logit_distill_loss(s_logits, t_logits, **options)
    unfused.backward(seed)
    return fused, fused_grads, unfused, [student[k].grad for k in sorted(student)]


@native
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_fused_linear_matches_unfused(divergence, reduction):
    tensors = _linear_case(teacher_vocab=26)
    labels = torch.tensor([1, -100, 2, 3, 4, -100, 5, 6, 7, 8])
    fused, fused_grads, unfused, unfused_grads = _fused_and_unfused(
        "cpu", tensors, chunk_size=3, divergence=divergence, reduction=reduction, labels=labels,
        vocab_size=23, temperature=2.0,
    )
    torch.testing.assert_close(fused, unfused, atol=2e-5, rtol=2e-5)
    for got, want in zip(fused_grads, unfused_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@native
def test_fused_linear_num_items_and_leading_dims_without_bias():
    tensors = _linear_case(rows=12, bias=False)
    tensors = {k: v.reshape(3, 4, -1) if "hidden" in k else v for k, v in tensors.items()}
    fused, fused_grads, unfused, unfused_grads = _fused_and_unfused(
        "cpu", tensors, chunk_size=5, divergence="reverse_kl", num_items=30
    )
    torch.testing.assert_close(fused, unfused, atol=2e-5, rtol=2e-5)
    for got, want in zip(fused_grads, unfused_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@native
@pytest.mark.slow
def test_fused_linear_compile_fullgraph_dynamic_matches_eager():
    sokd.set_backend("cpu")

    def step(hidden, weight, teacher_hidden, teacher_weight, labels):
        return fused_linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight,
                                         labels=labels, chunk_size=4, divergence="reverse_kl")

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for rows in (7, 11):
        tensors = _linear_case(rows=rows, bias=False)
        labels = torch.arange(rows)
        labels[0] = -100
        results = []
        for fn in (step, compiled):
            hidden = tensors["student_hidden"].clone().requires_grad_(True)
            weight = tensors["student_weight"].clone().requires_grad_(True)
            loss = fn(hidden, weight, tensors["teacher_hidden"], tensors["teacher_weight"], labels)
            loss.backward()
            results.append((loss.detach(), hidden.grad, weight.grad))
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want)


@native
@pytest.mark.slow
def test_compile_reduction_none_with_per_row_grad_output():
    """Under torch.compile the C++ autograd scales each row of the row op's saved gradient, and
    the fused op reruns its chunks in backward, with each row's own grad_output."""
    sokd.set_backend("cpu")

    def rows(student, teacher, seed):
        return (logit_distill_loss(student, teacher, reduction="none", divergence="jsd")
                * seed).sum()

    def fused(hidden, weight, teacher_hidden, teacher_weight, seed):
        return (fused_linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight,
                                          chunk_size=3, reduction="none") * seed).sum()

    compiled_rows = torch.compile(rows, fullgraph=True, dynamic=True)
    compiled_fused = torch.compile(fused, fullgraph=True, dynamic=True)
    for count in (7, 5):
        student, teacher, generator = _case(rows=count, vocab=11, seed=count)
        seed = torch.randn(count, generator=generator)
        tensors = _linear_case(rows=count, seed=count, bias=False)
        for eager, compiled, leaves, others in (
            (rows, compiled_rows, [student], [teacher]),
            (fused, compiled_fused, [tensors["student_hidden"], tensors["student_weight"]],
             [tensors["teacher_hidden"], tensors["teacher_weight"]]),
        ):
            grads = []
            for fn in (eager, compiled):
                params = [leaf.clone().requires_grad_(True) for leaf in leaves]
                fn(*params, *others, seed).backward()
                grads.append([param.grad for param in params])
            torch.testing.assert_close(grads[1], grads[0])


@native
def test_fused_linear_bf16_matches_reference_backend():
    tensors = {k: v.to(torch.bfloat16) for k, v in _linear_case(rows=6).items()}
    results = []
    for backend in ("cpu", "reference"):
        sokd.set_backend(backend)
        hidden = tensors["student_hidden"].clone().requires_grad_(True)
        others = {k: v for k, v in tensors.items() if k != "student_hidden"}
        loss = fused_linear_distill_loss(hidden, **others, chunk_size=4, divergence="jsd")
        loss.backward()
        results.append((loss.detach(), hidden.grad))
    assert results[0][1].dtype == torch.bfloat16
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1].float(), results[1][1].float(), atol=1e-3,
                               rtol=2e-2)


def test_fused_linear_module_matches_function():
    tensors = _linear_case(rows=4)
    module = sokd.FusedLinearDistillLoss(divergence="jsd", chunk_size=2)
    got = module(*(tensors[k] for k in ("student_hidden", "student_weight", "teacher_hidden",
                                         "teacher_weight", "student_bias", "teacher_bias")))
    want = fused_linear_distill_loss(**tensors, divergence="jsd")
    torch.testing.assert_close(got, want)


# --- data parallel training (2 gloo processes) ---------------------------------------------

WORLD_SIZE = 2


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _batch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * WORLD_SIZE, 5, 8, generator=g)
    teacher_hidden = torch.randn(2 * WORLD_SIZE, 5, 8, generator=g)
    teacher_weight = torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (2 * WORLD_SIZE, 5), generator=g)
    labels[labels % 3 == 0] = -100
    return hidden, teacher_hidden, teacher_weight, labels


class _Distilled(torch.nn.Module):
    """A student LM head and the fused loss in one module, so that DDP and FSDP2 see the
    forward that uses the head's parameters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(8, 30)

    def forward(self, hidden, teacher_hidden, teacher_weight, labels, num_items):
        return fused_linear_distill_loss(
            hidden, self.head.weight, teacher_hidden, teacher_weight, self.head.bias,
            labels=labels, num_items=num_items, chunk_size=3, divergence="jsd",
        )


def _distributed_step(rank, port, wrap, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        sokd.set_backend("cpu")
        distilled = _Distilled()
        if wrap == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(distilled)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            model = fully_shard(distilled, mesh=init_device_mesh("cpu", (WORLD_SIZE,)))
        hidden, teacher_hidden, teacher_weight, labels = _batch()
        mine = slice(2 * rank, 2 * rank + 2)
        # num_items is the global token count, as under gradient accumulation.
        num_items = (labels != -100).sum()
        loss = model(hidden[mine], teacher_hidden[mine], teacher_weight, labels[mine], num_items)
        # Both wrappers average the gradients over ranks; the losses of the ranks add up to
        # the global mean, so scale it back.
        (loss * WORLD_SIZE).backward()
        grads = []
        for param in (distilled.head.weight, distilled.head.bias):
            grad = param.grad
            grads.append(grad.full_tensor() if hasattr(grad, "full_tensor") else grad)
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            torch.save({"loss": total, "weight": grads[0], "bias": grads[1]}, out)
    finally:
        dist.destroy_process_group()
    # The result is saved. Leave without the interpreter's teardown, where torch's FSDP2 on
    # gloo now and then aborts ("terminate called without an active exception") after the work
    # is done; an exception above still fails the process as usual.
    os._exit(0)


@native
@pytest.mark.slow
@pytest.mark.parametrize("wrap", ("ddp", "fsdp2"))
def test_data_parallel_matches_single_process(wrap, tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    out = tmp_path / "result.pt"
    mp.spawn(_distributed_step, args=(_free_port(), wrap, str(out)), nprocs=WORLD_SIZE)
    result = torch.load(out)
    hidden, teacher_hidden, teacher_weight, labels = _batch()
    sokd.set_backend("cpu")
    distilled = _Distilled()
    head = distilled.head
    loss = distilled(hidden, teacher_hidden, teacher_weight, labels, None)
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach())
    torch.testing.assert_close(result["weight"], head.weight.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result["bias"], head.bias.grad, atol=1e-6, rtol=1e-5)
