"""The contract table of docs/robustness.md, walked cell by cell.

The table says, for every public op and backend, whether torch.compile (fullgraph, dynamic
shapes), torch.func, torch.jit.trace, torch.export, a second derivative and gradients of masks
and weights work or raise a clear error. This module reads the table from the docs and runs
each cell: "works" cells must give the reference's values, "raises" cells must raise the error
the table names. A cell the tests cannot run, or a table that misses an op or a backend, fails.
"""

import builtins
import pathlib
import re

import pytest
import torch
from backend_matrix import ALL_TARGETS, assert_matches, using

from sokd import ops
from sokd.augment_ops import ROTATE, TRANSLATE_X

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "robustness.md"
FEATURES = ("fullgraph", "dynamic", "torch.func", "jit.trace", "torch.export",
            "double backward", "mask/weight grad")
SECOND_DERIVATIVE_REFUSED = "differentiable once"


def read_table():
    """{(op, backend): {feature: cell}} from the markdown table under '## Contract'."""
    text = DOC.read_text()
    section = text[text.index("## Contract"):]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header[:2] == ["op", "backend"] and tuple(header[2:]) == FEATURES, header
    table = {}
    for line in rows[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        op, backend = cells[0].strip("`"), cells[1]
        table[(op, backend)] = dict(zip(FEATURES, cells[2:]))
    return table


def _randn(shape, seed, device, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).float().to(device)


class Case:
    """An op as fn(*args) with args built for a batch size n; `grad_index` is the argument
    that gets a gradient (None for ops without one), `constant_index` a mask or weight that
    must get none."""

    def __init__(self, fn, build, grad_index=0, constant_index=None):
        self.fn, self.build = fn, build
        self.grad_index, self.constant_index = grad_index, constant_index


def _logits(n, device, seed):
    return _randn((n, 5), seed, device, 2.0)


def _labels(n, device, seed):
    """Class labels of n rows, every third row ignored (-100)."""
    rows = torch.arange(n, device=device)
    return torch.where(rows % 3 == 0, -100, (rows + seed) % 5)


CASES = {
    "masked_feature_loss": Case(
        lambda s, t, m: ops.masked_feature_loss(s, t, m, "mask"),
        lambda n, d, k: (_randn((n, 3, 4, 5), k, d), _randn((n, 3, 4, 5), k + 1, d),
                         _randn((n, 4, 5), k + 2, d).abs()),
        constant_index=2,
    ),
    "kd_loss": Case(
        lambda s, t, w: ops.kd_loss(s, t, 3.0, w),
        lambda n, d, k: (_logits(n, d, k), _logits(n, d, k + 1), _randn((n,), k + 2, d).abs()),
        constant_index=2,
    ),
    "decoupled_kd_loss": Case(
        lambda s, t: ops.decoupled_kd_loss(s, t, t > 0.5, 1.0, 2.0, 3.0),
        lambda n, d, k: (_logits(n, d, k), _logits(n, d, k + 1)),
    ),
    "dkd_loss": Case(
        lambda s, t, y: ops.dkd_loss(s, t, y, 1.0, 2.0, 3.0),
        lambda n, d, k: (_logits(n, d, k), _logits(n, d, k + 1),
                         torch.arange(k, k + n, device=d) % 5),
    ),
    "top_class_mask": Case(
        lambda t, s: ops.top_class_mask(t, s, 0.4),
        lambda n, d, k: (_logits(n, d, k), _logits(n, d, k + 1)),
        grad_index=None,
    ),
    "interest_map": Case(
        lambda heat, wh, offset: ops.interest_map(heat, wh, offset, k=3, kernel=3),
        lambda n, d, k: (_randn((n, 1, 5, 6), k, d), _randn((n, 2, 5, 6), k + 1, d, 3.0).abs(),
                         _randn((n, 2, 5, 6), k + 2, d)),
        grad_index=None,
    ),
    "feature_augment": Case(
        lambda m, x: ops.feature_augment(x, [ROTATE, TRANSLATE_X], m),
        lambda n, d, k: (torch.tensor([0.3 + 0.1 * k % 0.5, 0.7], device=d),
                         _randn((n, 3, 5, 6), k, d)),
    ),
    "logit_distill_loss": Case(
        lambda s, t, y: ops.logit_distill_loss(s, t, labels=y, divergence="jsd",
                                               temperature=2.0),
        lambda n, d, k: (_logits(n, d, k), _logits(n, d, k + 1), _labels(n, d, k)),
    ),
    "fused_linear_distill_loss": Case(
        lambda h, w, th, tw: ops.fused_linear_distill_loss(h, w, th, tw, chunk_size=3,
                                                           divergence="reverse_kl"),
        lambda n, d, k: (_randn((n, 4), k, d), _randn((5, 4), k + 1, d),
                         _randn((n, 3), k + 2, d), _randn((5, 3), k + 3, d)),
    ),
}


def _outputs(value):
    return value if isinstance(value, tuple) else (value,)


def _evaluate(case, fn, args):
    """The outputs of fn(*args), and the gradient of the first output with respect to the
    differentiated argument (a fresh leaf)."""
    args = list(args)
    if case.grad_index is not None:
        args[case.grad_index] = args[case.grad_index].detach().requires_grad_()
    outputs = _outputs(fn(*args))
    grads = ()
    if case.grad_index is not None:
        grads = torch.autograd.grad(outputs[0].sum(), args[case.grad_index])
    return tuple(o.detach() for o in outputs) + grads


def _expected(case, args):
    with using("reference"):
        return _evaluate(case, case.fn, args)


def _compare(actual, expected, what):
    assert len(actual) == len(expected), what
    for index, (got, want) in enumerate(zip(actual, expected)):
        assert_matches(got, want, f"{what} output {index}")


def _reset():
    torch._dynamo.reset()


# The contract cells compile with aot_eager: Dynamo, AOTAutograd and fake tensors, which is
# everything torch.compile asks of an op (its fake kernel, its autograd under symbolic sizes);
# Inductor's code generation stops at the ops. tests/test_training.py compiles with Inductor.
# The Triton interpreter cannot run under AOTAutograd's tracing (it reads the data pointers of
# fake tensors), so interpreted Triton cells compile with Dynamo alone; on a GPU they take the
# whole path.
COMPILE_BACKEND = "aot_eager"


def _compile_backend(backend, device):
    return "eager" if backend == "triton" and device.type == "cpu" else COMPILE_BACKEND


def check_fullgraph(case, backend, device):
    _reset()
    compiled = torch.compile(case.fn, fullgraph=True, backend=_compile_backend(backend, device))
    args = case.build(4, device, 0)
    with using(backend):
        actual = _evaluate(case, compiled, args)
    _compare(actual, _expected(case, args), "fullgraph")


def check_dynamic(case, backend, device):
    _reset()
    compiled = torch.compile(case.fn, dynamic=True, backend=_compile_backend(backend, device))
    for n in (4, 3, 2):
        args = case.build(n, device, n)
        with using(backend):
            actual = _evaluate(case, compiled, args)
        _compare(actual, _expected(case, args), f"dynamic n={n}")


def check_func(case, backend, device):
    """torch.func.grad of the summed first output, and vmap over a batch of argument sets."""
    sets = [case.build(3, device, seed) for seed in (0, 1)]
    stacked = [torch.stack(values) for values in zip(*sets)]
    with using(backend):
        mapped = _outputs(torch.func.vmap(case.fn)(*stacked))
        if case.grad_index is not None:
            def first_output_sum(*args):
                return _outputs(case.fn(*args))[0].sum()

            grad = torch.func.grad(first_output_sum, argnums=case.grad_index)(*sets[0])
    for index, args in enumerate(sets):
        expected = _expected(case, args)
        _compare(tuple(o[index] for o in mapped), expected[: len(mapped)], f"vmap item {index}")
    if case.grad_index is not None:
        assert_matches(grad, _expected(case, sets[0])[-1], "torch.func.grad")


def check_trace(case, backend, device):
    with using(backend):
        traced = torch.jit.trace(case.fn, case.build(4, device, 0), check_trace=False)
        args = case.build(4, device, 5)
        actual = _evaluate(case, traced, args)
    _compare(actual, _expected(case, args), "jit.trace")


class _AsModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def check_export(case, backend, device):
    with using(backend):
        program = torch.export.export(_AsModule(case.fn), tuple(case.build(4, device, 0)))
        args = case.build(4, device, 5)
        actual = _outputs(program.module()(*args))
    expected = _expected(case, args)
    _compare(tuple(o.detach() for o in actual), expected[: len(actual)], "torch.export")


def _derivative(value, x):
    """d value / d x, or None where value does not depend on x (a constant first derivative,
    as the straight-through rule of feature_augment gives)."""
    if not value.requires_grad:
        return None
    return torch.autograd.grad(value, x, allow_unused=True)[0]


def check_double_backward(case, backend, device):
    args = list(case.build(4, device, 0))
    x = args[case.grad_index] = args[case.grad_index].double().requires_grad_()
    for index, value in enumerate(args):
        if index != case.grad_index and value.is_floating_point():
            args[index] = value.double()
    with using(backend):
        (grad,) = torch.autograd.grad(_outputs(case.fn(*args))[0].sum(), x, create_graph=True)
        second = _derivative(grad.square().sum(), x)
    with using("reference"):
        reference_x = x.detach().clone().requires_grad_()
        args[case.grad_index] = reference_x
        (grad,) = torch.autograd.grad(
            _outputs(case.fn(*args))[0].sum(), reference_x, create_graph=True
        )
        expected = _derivative(grad.square().sum(), reference_x)
    if expected is None:
        assert second is None or not second.any()
    else:
        assert_matches(second, expected, "second derivative")


def check_constant(case, backend, device):
    """The mask or weight requires grad, yet gets none, and the loss does not depend on it
    differentiably."""
    args = list(case.build(4, device, 0))
    constant = args[case.constant_index] = args[case.constant_index].requires_grad_()
    x = args[case.grad_index] = args[case.grad_index].requires_grad_()
    with using(backend):
        loss = case.fn(*args)
    assert torch.autograd.grad(loss, (x, constant), allow_unused=True)[1] is None


CHECKS = {
    "fullgraph": check_fullgraph,
    "dynamic": check_dynamic,
    "torch.func": check_func,
    "jit.trace": check_trace,
    "torch.export": check_export,
    "double backward": check_double_backward,
    "mask/weight grad": check_constant,
}
# Cells whose check compiles or runs interpreted Triton for long.
SLOW_FEATURES = ("fullgraph", "dynamic")

TABLE = read_table()
# The device each backend runs on here; the reference runs its rows on the CPU.
BACKENDS = {
    target.backend: target
    for target in ALL_TARGETS
    if not (target.backend == "reference" and target.device.type != "cpu")
}


def _cells():
    for (op, backend), cells in sorted(TABLE.items()):
        for feature, cell in cells.items():
            marks = []
            slow = feature in SLOW_FEATURES or backend == "triton"
            if slow:
                marks.append(pytest.mark.slow)
            yield pytest.param(op, backend, feature, cell, id=f"{op}-{backend}-{feature}",
                               marks=marks)


def test_table_covers_every_op_and_backend():
    ops_in_table = {op for op, _ in TABLE}
    backends_in_table = {backend for _, backend in TABLE}
    assert ops_in_table == set(CASES)
    assert backends_in_table == {"reference", "cpu", "cuda", "triton"}
    assert len(TABLE) == len(ops_in_table) * len(backends_in_table)


@pytest.mark.parametrize("op, backend, feature, cell", list(_cells()))
def test_contract_cell(op, backend, feature, cell):
    if backend not in BACKENDS:
        pytest.skip(f"the {backend} backend is not available here")
    case = CASES[op]
    check = CHECKS[feature]
    device = BACKENDS[backend].device
    if cell == "n/a":
        # Only where the op has nothing the feature applies to.
        if feature == "mask/weight grad":
            assert case.constant_index is None
        else:
            assert feature == "double backward" and case.grad_index is None
        return
    match = re.fullmatch(r"(works|raises (\w+Error)(?:: (.+))?) \(tested\)", cell)
    assert match, f"cell {cell!r} is neither 'works (tested)' nor 'raises <Error> (tested)'"
    if cell.startswith("works"):
        check(case, backend, device)
        return
    error = getattr(builtins, match.group(2))
    with pytest.raises(error, match=match.group(3) or ""):
        check(case, backend, device)
