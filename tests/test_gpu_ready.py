"""What a GPU would run, checked without one: the defects a review of the GPU code found.

The Triton kernels run here through the interpreter (conftest.py sets TRITON_INTERPRET=1 when
there is no GPU) and compile for sm_90 through Triton's own compiler and ptxas, which need no
GPU (tests/triton_compile.py). Tests marked `gpu` need CUDA devices and are skipped without.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import sokd
from sokd import ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

# The interpreter evaluates masked-out lanes too (-inf - -inf there); the kernels discard them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

KERNEL_MODULES = ("decoupled_kd_loss", "feature_augment", "interest_map", "kd_loss",
                  "masked_feature_loss")


def _module(name):
    return importlib.import_module(f"sokd.kernels.{name}")


def _every_op(device, dtype=torch.float32):
    """One call of each public op on the current backend, gradients included."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    student = randn(4, 10).requires_grad_()
    ops.kd_loss(student, randn(4, 10)).backward()
    ops.dkd_loss(student, randn(4, 10), torch.tensor([1, 2, 3, 4], device=device)).backward()
    features = randn(2, 3, 5, 5).requires_grad_()
    mask = torch.rand(2, 5, 5, generator=generator, device=device)
    ops.masked_feature_loss(features, randn(2, 3, 5, 5), mask, "mask").backward()
    heat = torch.rand(2, 1, 6, 6, generator=generator, device=device)
    ops.interest_map(heat, heat.repeat(1, 2, 1, 1) * 4, heat.repeat(1, 2, 1, 1), k=3)
    ops.feature_augment(features.detach(), [0, 8], torch.tensor([0.4, 0.6], device=device))


# 1. Every launch under a guard of the input's device ---------------------------------------


def test_every_triton_launch_runs_under_a_guard_of_the_inputs_device(monkeypatch):
    active = []  # devices of the guards entered and not yet left
    launches = []
    for name in KERNEL_MODULES:
        module = _module(name)

        @contextlib.contextmanager
        def guard(tensor, real_guard=module.on_device):
            with real_guard(tensor):
                active.append(tensor.device)
                try:
                    yield
                finally:
                    active.pop()

        def wrap(kernel, real_wrap=module.wrap_triton):
            class _Grid:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        launches.append((kernel.fn.__name__, list(active)))
                        return real_wrap(kernel)[grid](*args, **kwargs)

                    return launch

            return _Grid()

        monkeypatch.setattr(module, "on_device", guard)
        monkeypatch.setattr(module, "wrap_triton", wrap)

    sokd.set_backend("triton")
    _every_op(DEVICE)
    assert {name for name, _ in launches} == {
        "_kd_kernel", "_decoupled_kd_kernel", "_masked_feature_loss_kernel",
        "_candidates_kernel", "_decode_kernel", "_count_kernel", "_feature_augment_kernel",
    }
    for name, guards in launches:
        assert guards == [torch.device(DEVICE)], f"{name} launched under guards {guards}"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_ops_on_the_second_gpu_match_the_reference():
    with torch.cuda.device(0):
        sokd.set_backend("triton")
        student = torch.randn(64, 100, device="cuda:1", requires_grad=True)
        teacher = torch.randn(64, 100, device="cuda:1")
        loss = ops.kd_loss(student, teacher)
        (grad,) = torch.autograd.grad(loss, student)
        sokd.set_backend("reference")
        expected = ops.kd_loss(student, teacher)
        (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


# 2. and 3. Half-precision gradients: computed in float32, rounded once ----------------------


def _gradient(backend, op, leaves, scale):
    sokd.set_backend(backend)
    leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    (op(*leaves) * scale).backward()
    return [leaf.grad for leaf in leaves]


def test_float16_masked_feature_gradient_does_not_overflow():
    # 2 * mask^2 * (s - t) = 2 * 64 * 600 passes float16's 65504; the gradient itself,
    # divided by Z, does not.
    student = torch.full((2, 3, 4, 4), 600.0, device=DEVICE).half()
    teacher = torch.zeros_like(student)
    mask = torch.full((2, 4, 4), 8.0, device=DEVICE)
    for normalize in ("mask", "elements"):
        def loss(s, t, normalize=normalize):
            return ops.masked_feature_loss(s, t, mask, normalize)

        grads = _gradient("triton", loss, [student, teacher], 1.0)
        expected = _gradient("reference", loss, [student.float(), teacher.float()], 1.0)
        for grad, exact in zip(grads, expected):
            assert torch.isfinite(grad).all(), normalize
            torch.testing.assert_close(grad, exact.half(), rtol=0, atol=0)


def _half_spacing(exact, dtype):
    """Half the spacing of `dtype` at each value of `exact`: the most that rounding `exact`
    once to `dtype` can move it (subnormals share the spacing of the smallest normals)."""
    stored_bits, smallest_normal_exponent = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}[
        dtype
    ]
    _, exponent = torch.frexp(exact)  # exact = m * 2^exponent with 0.5 <= |m| < 1
    exponent = exponent.clamp(min=smallest_normal_exponent + 1)
    return torch.ldexp(torch.ones_like(exact), exponent - stored_bits - 2)


HALF_CASES = {
    "kd_loss": lambda s, t: ops.kd_loss(s, t, 2.0),
    "weighted_kd_loss": lambda s, t: ops.kd_loss(
        s, t, 2.0, torch.linspace(0.5, 1.5, s.shape[0], device=s.device)
    ),
    "dkd_loss": lambda s, t: ops.dkd_loss(
        s, t, torch.arange(s.shape[0], device=s.device) % s.shape[1], 1.0, 8.0, 2.0
    ),
    "masked_feature_loss": lambda s, t: ops.masked_feature_loss(
        s.reshape(4, 5, 8, 7), t.reshape(4, 5, 8, 7), None, "elements"
    ),
}


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("case", sorted(HALF_CASES))
def test_half_precision_gradients_are_rounded_once(case, dtype):
    """Every entry within half a spacing of the dtype of the exact (float64) gradient, as
    the float32 result rounded once is. The incoming gradient 0.3 is not a power of two, so a
    gradient rounded before it is applied and again after misses this bound."""
    torch.manual_seed(0)
    loss = HALF_CASES[case]
    student = (torch.randn(32, 35, device=DEVICE) * 3).to(dtype)
    teacher = (torch.randn(32, 35, device=DEVICE) * 3).to(dtype)
    (grad,) = _gradient("triton", lambda s: loss(s, teacher), [student], 0.3)
    (exact,) = _gradient("reference", lambda s: loss(s, teacher.double()), [student.double()], 0.3)
    assert grad.dtype == dtype
    error = (grad.double() - exact).abs()
    # Float32 arithmetic (and a GPU's fast exp) adds a little of the largest entry where
    # terms cancel, which can tip an entry near a midpoint to its other neighbour.
    allowed = _half_spacing(exact, dtype) + 1e-6 * exact.abs().max()
    worst = (error / allowed).max().item()
    assert worst <= 1, f"{case} {dtype}: error up to {worst:.3g} times one rounding's"


# 4. 64-bit offsets, and what ptxas reports, from the kernels compiled for sm_90 ------------


def _compile_report(folder):
    """Compile every Triton kernel for sm_90 in a subprocess without the interpreter, run in
    `folder` so that it imports the installed sokd (with sokd.kernels), not the checkout's."""
    script = (
        "import json, torch, triton_compile as tc\n"
        "rows = []\n"
        "for launch in tc.op_launches(tc.representative_ops()):\n"
        "    c = tc.compile_launch(launch)\n"
        "    rows.append({'name': c.name, 'spills': c.spill_bytes,\n"
        "                 'narrow': tc.narrow_tensor_offsets(c.ttir),\n"
        "                 'vector_loads': 'ld.global.v4' in c.ptx,\n"
        "                 'kwargs': {k: str(v) for k, v in launch.kwargs.items()}})\n"
        "print(json.dumps(rows))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "tests")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=folder,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    pytest.importorskip("triton")
    return _compile_report(tmp_path_factory.mktemp("compile"))


@pytest.mark.slow
def test_every_kernel_offsets_tensors_of_pointers_in_64_bits(compile_report):
    """A product such as channel * (H*W) passes 2^31 for a large map; in 32 bits it wraps."""
    for row in compile_report:
        assert row["narrow"] == [], f"{row['name']} offsets pointers in 32 bits: {row['narrow']}"


@pytest.mark.slow
def test_no_kernel_spills_registers(compile_report):
    """ptxas reported spills for 128 x 32 dense DKD tiles and for two affine ops at 1024
    elements per program."""
    for row in compile_report:
        assert row["spills"] == 0, f"{row['name']} spills {row['spills']} bytes: {row['kwargs']}"


@pytest.mark.slow
def test_rows_of_1000_classes_are_read_with_16_byte_loads(compile_report):
    """Triton proves alignment only for sizes divisible by 16; the kernels state it for K=1000."""
    rows = [row for row in compile_report if row["name"] in ("_kd_kernel", "_decoupled_kd_kernel")]
    assert rows
    for row in rows:
        if row["kwargs"]["BLOCK_K"] == "1024":
            assert row["vector_loads"], row


# 5. interest_map: grids within the CUDA limits, and no window unrolled at compile time -----


def test_interest_map_grids_stay_within_cuda_limits():
    launch_plan = _module("interest_map").launch_plan
    plan = launch_plan(images=4, channels=80, height=2048, width=2048, k=100)
    assert plan["chunks"] > 65535  # the old (images, chunks) grid failed here
    for key in ("candidates_grid", "decode_grid", "count_grid"):
        grid = plan[key]
        assert len(grid) == 1 and 0 < grid[0] < 2**31, (key, grid)


def test_interest_map_kernel_far_larger_than_the_map():
    """kernel=10001 once meant a 10001 x 10001 loop unrolled at compile time, which never
    finished compiling. sokd.ops now also caps the window at the map, so the launcher is called
    directly: its window loop must run at run time, whatever size it is handed."""
    torch.manual_seed(0)
    heat = torch.rand(2, 2, 9, 7, device=DEVICE)
    wh = torch.rand(2, 2, 9, 7, device=DEVICE) * 4
    offset = torch.rand(2, 2, 9, 7, device=DEVICE)
    count, boxes, scores = _module("interest_map").interest_map(heat, wh, offset, 4, 10001)
    sokd.set_backend("reference")
    expected = ops.interest_map(heat, wh, offset, k=4, kernel=ops.MAX_KERNEL)
    torch.testing.assert_close(count, expected[0])
    torch.testing.assert_close(boxes, expected[1])
    torch.testing.assert_close(scores, expected[2])


# Decoupled KD of a row of -inf student logits: NaN, as the reference gives -----------------


@pytest.mark.parametrize("dense", (False, True))
def test_decoupled_kd_row_of_minus_inf_student_logits_is_nan(dense):
    student = torch.randn(3, 6, device=DEVICE)
    student[1] = float("-inf")
    teacher = torch.randn(3, 6, device=DEVICE)
    mask = torch.zeros(3, 6, dtype=torch.bool, device=DEVICE)
    mask[:, 2] = True
    if dense:
        student, teacher, mask = (x.t().reshape(1, 6, 3, 1) for x in (student, teacher, mask))
    results = {}
    for backend in ("reference", "triton"):
        sokd.set_backend(backend)
        results[backend] = ops.decoupled_kd_loss(student, teacher, mask)
    assert torch.isnan(results["reference"])
    assert torch.isnan(results["triton"])


# 6. The CUDA architectures built by default include PTX --------------------------------------


def test_default_cuda_arch_list_embeds_ptx_for_newer_gpus():
    tree = ast.parse((ROOT / "setup.py").read_text())
    values = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        and isinstance(node.targets[0], ast.Name)
    }
    archs = values["DEFAULT_CUDA_ARCH_LIST"].split(";")
    assert "9.0+PTX" in archs, archs
    newest = max(archs, key=lambda arch: float(arch.split("+")[0]))
    assert newest.endswith("+PTX")
