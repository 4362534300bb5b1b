"""Compile the Triton kernels of an op for a GPU without one, to inspect what a GPU would run.

Triton's compiler and its bundled ptxas run on any machine: only loading the binary needs a GPU.
`record_launches` runs an op on CPU tensors with every launch intercepted (the kernels do not
run), and `compile_launch` compiles one recorded launch for an NVIDIA architecture the way
Triton's JIT would specialise it, giving its TTIR, PTX and ptxas's resource report.

This must run with TRITON_INTERPRET unset: under the interpreter `triton.jit` gives
interpreted functions, which do not compile. The tests therefore call it in a subprocess:

    python tests/triton_compile.py   # compile every kernel once; exit 1 on spills or 32-bit offsets
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator

import torch

_POINTER_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "i1",
    torch.uint8: "u8",
}


@dataclasses.dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Compiled:
    name: str
    ttir: str
    ptx: str
    spill_bytes: int
    registers: int


@contextlib.contextmanager
def record_launches(modules) -> Iterator[list[Launch]]:
    """Within the block, launches through `wrap_triton` in `modules` are recorded, not run."""
    launches: list[Launch] = []

    def recording_wrap(kernel):
        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append(Launch(kernel, tuple(grid), args, kwargs))

                return launch

        return _Grid()

    saved = [(module, module.wrap_triton) for module in modules]
    try:
        for module, _ in saved:
            module.wrap_triton = recording_wrap
        yield launches
    finally:
        for module, original in saved:
            module.wrap_triton = original


def _specialise(value):
    """(signature type, divisible by 16) as Triton's JIT specialises an argument."""
    if value is None:
        return "constexpr", False
    if isinstance(value, torch.Tensor):
        # Fresh allocations are 16-byte aligned; so are the views the ops pass.
        aligned = value.data_ptr() % 16 == 0
        return "*" + _POINTER_TYPES[value.dtype], aligned
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        kind = "i32" if -(2**31) <= value < 2**31 else "i64"
        return kind, value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot specialise a kernel argument of type {type(value).__name__}")


def compile_launch(launch: Launch, arch: int = 90) -> Compiled:
    """Compile a recorded launch for sm_<arch> (no GPU needed) and run ptxas -v on its PTX."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    kernel = launch.kernel
    names = kernel.arg_names
    options = {
        key: launch.kwargs[key] for key in ("num_warps", "num_stages") if key in launch.kwargs
    }
    values = dict(zip(names, launch.args))
    values.update({key: value for key, value in launch.kwargs.items() if key not in options})
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(names):
        value = values[name]
        if index in kernel.constexprs:
            signature[name] = "constexpr"
            constexprs[(index,)] = value
            continue
        kind, divisible = _specialise(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = value
        elif divisible:
            attrs[(index,)] = BaseBackend.parse_attr("D")
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    report = _ptxas_report(get_ptxas(arch).path, ptx, arch)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))
    registers = max((int(n) for n in re.findall(r"Used (\d+) registers", report)), default=0)
    return Compiled(kernel.fn.__name__, compiled.asm["ttir"], ptx, spills, registers)


def _ptxas_report(ptxas, ptx, arch):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        suffix = "a" if arch == 90 else ""
        result = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", source, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        )
    return result.stdout + result.stderr


def narrow_tensor_offsets(ttir: str) -> list[str]:
    """Lines of TTIR that offset a tensor of pointers by computed 32-bit integers (a constant
    offset, such as the next field of a record, cannot overflow)."""
    pattern = re.compile(
        r"tt\.addptr %[\w.]+, %(?!cst)[\w.]+ : tensor<[^>]*!tt\.ptr<[^>]*>>, tensor<[0-9x]*xi32>"
    )
    return [line.strip() for line in ttir.splitlines() if pattern.search(line)]


def op_launches(run_ops: Callable[[], None]) -> list[Launch]:
    """Every launch that `run_ops` makes through the kernel modules, recorded, not run."""
    modules = [
        importlib.import_module(f"sokd.kernels.{name}")
        for name in (
            "decoupled_kd_loss",
            "feature_augment",
            "interest_map",
            "kd_loss",
            "masked_feature_loss",
        )
    ]
    with record_launches(modules) as launches:
        run_ops()
    return launches


def representative_ops(dtype=torch.float32):
    """One call of every Triton launcher at a small shape, with the gradient wanted."""
    from sokd import kernels
    from sokd.augment_ops import AFFINE_OPS, draw_randomness, op_values

    def run():
        student = torch.randn(4, 1000, dtype=dtype, requires_grad=True)
        teacher = torch.randn(4, 1000, dtype=dtype)
        kernels.kd_loss(student, teacher, 4.0, None, True)
        kernels.kd_loss(student, teacher, 4.0, torch.rand(4), True)
        mask = torch.zeros(4, 1000, dtype=torch.bool)
        mask[:, 0] = True
        kernels.decoupled_kd_loss(student, teacher, mask, 1.0, 8.0, 4.0, True)
        dense = torch.randn(2, 19, 32, 32, dtype=dtype, requires_grad=True)
        dense_mask = torch.zeros(2, 19, 32, 32, dtype=torch.bool)
        kernels.decoupled_kd_loss(dense, dense.detach(), dense_mask, 1.0, 8.0, 4.0, True)
        features = torch.randn(2, 64, 16, 16, dtype=dtype, requires_grad=True)
        kernels.masked_feature_loss(features, features.detach(), torch.rand(2, 16, 16), True, True)
        heat = torch.rand(2, 1, 16, 16, dtype=dtype)
        kernels.interest_map(heat, torch.rand(2, 2, 16, 16), torch.rand(2, 2, 16, 16), 8, 3)
        affine = sorted(AFFINE_OPS)[:2]
        values = op_values(torch.tensor([0.5, 0.5]), affine)
        draws = draw_randomness(affine, features.shape, features.device)
        kernels.feature_augment(features.detach(), affine, values, draws, [0] * len(affine))

    return run


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels do not compile", file=sys.stderr)
        return 2
    problems = 0
    for launch in op_launches(representative_ops()):
        compiled = compile_launch(launch)
        narrow = narrow_tensor_offsets(compiled.ttir)
        print(
            f"{compiled.name}: {compiled.registers} registers, {compiled.spill_bytes} bytes "
            f"spilled, {len(narrow)} 32-bit tensor offsets"
        )
        problems += compiled.spill_bytes > 0 or bool(narrow)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
