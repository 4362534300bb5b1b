"""pytest-benchmark suite: the cases of run.py at small sizes, one benchmark per contender.

    pytest benchmarks/ --benchmark-only

Each contender is checked against the eager reference before it is timed, as in run.py.
"""

import pytest
import torch
from cases import CASES
from measure import compare
from shapes import Shape
from suite import backend_skip_reasons

import sokd

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL_SHAPES = {
    "small": Shape(n=16, c=32, h=16, w=16, k=100),
    "small-dense": Shape(n=2, c=16, h=32, w=32, k=19, dense=True),
}


def _params():
    backends = backend_skip_reasons(DEVICE)
    for shape_name, shape in SMALL_SHAPES.items():
        for case in CASES:
            if case.skip_reason(shape, DEVICE) is not None:
                continue
            for contender in case.contenders(DEVICE, backends):
                yield pytest.param(
                    shape, case, contender, id=f"{shape_name}-{case.name}-{contender.name}"
                )


@pytest.fixture(autouse=True)
def restore_backend():
    previous = sokd.get_backend()
    yield
    sokd.set_backend(previous)


@pytest.mark.parametrize("shape, case, contender", list(_params()))
def test_forward_backward(benchmark, shape, case, contender):
    if contender.skip_reason is not None:
        pytest.skip(contender.skip_reason)
    torch.manual_seed(0)
    inputs = case.make_inputs(shape, DEVICE, torch.float32)
    expected = case.contenders(DEVICE, [])[0].prepare(inputs)()
    step = contender.prepare(inputs)
    mismatch = compare(step(), expected, torch.float32, case.tolerance_scale)
    assert mismatch is None, f"{contender.name} disagrees with the reference: {mismatch}"
    benchmark.group = f"{case.name} {shape.describe()}"
    if DEVICE.type == "cuda":

        def synchronized_step():
            outputs = step()
            torch.cuda.synchronize()
            return outputs

        benchmark(synchronized_step)
    else:
        benchmark(step)
