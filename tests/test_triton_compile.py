"""Every Triton kernel compiles for Hopper (sm_90), even on a machine without a GPU.

The interpreter runs the kernels as NumPy code, which accepts things the compiler rejects
(loop-carried types that change, values defined inside loops, bfloat16 it cannot represent).
Compiling each kernel to a cubin for sm_90 catches those. It needs no driver, but the kernels
must be imported without TRITON_INTERPRET, so the compilation runs in a subprocess.
"""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

TARGET_ARCH = 90


def _signature(kernel, types, constexprs):
    """The compiler's signature of `kernel`: given types, constexprs, and i32 for the rest."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = types.get(name, "i32")
    return signature


def _compile(kernel, types, constexprs, num_warps=4):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(
        fn=kernel,
        signature=_signature(kernel, types, constexprs),
        constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", TARGET_ARCH, 32), options={"num_warps": num_warps}
    )
    assert compiled.asm["cubin"]


def _loss_cases():
    import triton.language as tl
    from sokd.kernels.decoupled_kd_loss import _decoupled_kd_kernel
    from sokd.kernels.kd_loss import _kd_kernel
    from sokd.kernels.masked_feature_loss import _masked_feature_loss_kernel

    # bfloat16 in every variant (the interpreter cannot run it); float64 in one of each.
    for element, acc in (("bf16", tl.float32), ("fp64", tl.float64)):
        partial = "*fp64" if acc == tl.float64 else "*fp32"
        for has_mask in (False, True) if element == "bf16" else (True,):
            yield (
                _masked_feature_loss_kernel,
                {
                    "student_ptr": f"*{element}",
                    "teacher_ptr": f"*{element}",
                    "mask_ptr": f"*{element}",
                    "scale_ptr": partial,
                    # Half-precision gradients are saved in float32 (rounded once later).
                    "grad_ptr": partial,
                    "partial_ptr": partial,
                },
                {
                    "HAS_MASK": has_mask,
                    "COMPUTE_GRAD": True,
                    "ACC_TYPE": acc,
                    "BLOCK_C": 8,
                    "BLOCK_P": 256,
                    **({} if has_mask else {"mask_ptr": None}),
                },
            )
        for single_chunk in (True, False) if element == "bf16" else (True,):
            yield (
                _kd_kernel,
                {
                    "student_ptr": f"*{element}",
                    "teacher_ptr": f"*{element}",
                    "weight_ptr": f"*{element}",
                    "scale_ptr": partial,
                    "grad_ptr": partial,
                    "partial_ptr": partial,
                    "temperature": "fp32",
                },
                {
                    "HAS_WEIGHT": True,
                    "COMPUTE_GRAD": True,
                    "ACC_TYPE": acc,
                    "BLOCK_R": 4,
                    "BLOCK_K": 1024,
                    "SINGLE_CHUNK": single_chunk,
                    "ROW_ALIGN": 8 if single_chunk else 1,
                },
            )
            yield (
                _decoupled_kd_kernel,
                {
                    "student_ptr": f"*{element}",
                    "teacher_ptr": f"*{element}",
                    "mask_ptr": "*i1",
                    "scale_ptr": partial,
                    "grad_ptr": partial,
                    "partial_ptr": partial,
                    "temperature": "fp32",
                    "alpha": "fp32",
                    "beta": "fp32",
                },
                {
                    "COMPUTE_GRAD": True,
                    "ACC_TYPE": acc,
                    "BLOCK_R": 4,
                    "BLOCK_K": 1024,
                    "SINGLE_CHUNK": single_chunk,
                    "ROW_ALIGN": 8 if single_chunk else 1,
                },
            )
    yield (
        _kd_kernel,
        {
            "student_ptr": "*fp32",
            "teacher_ptr": "*fp32",
            "scale_ptr": "*fp32",
            "partial_ptr": "*fp32",
            "temperature": "fp32",
        },
        {
            "weight_ptr": None,
            "grad_ptr": None,
            "HAS_WEIGHT": False,
            "COMPUTE_GRAD": False,
            "ACC_TYPE": tl.float32,
            "BLOCK_R": 64,
            "BLOCK_K": 32,
            "SINGLE_CHUNK": True,
            "ROW_ALIGN": 1,
        },
    )


def _interest_map_cases():
    import triton.language as tl
    from sokd.kernels.interest_map import _candidates_kernel, _count_kernel, _decode_kernel

    for element, acc in (("bf16", tl.float32), ("fp64", tl.float64)):
        values = "*fp64" if acc == tl.float64 else "*fp32"
        yield (
            _candidates_kernel,
            {
                "heat_ptr": f"*{element}",
                "value_ptr": values,
                "index_ptr": "*i64",
            },
            {"ACC_TYPE": acc, "BLOCK": 1024},
        )
        yield (
            _decode_kernel,
            {
                "value_ptr": values,
                "index_ptr": "*i64",
                "wh_ptr": f"*{element}",
                "offset_ptr": f"*{element}",
                "boxes_ptr": "*i64",
                "scores_ptr": f"*{element}",
            },
            {"ACC_TYPE": acc, "BLOCK": 128},
        )
    yield (
        _count_kernel,
        {"boxes_ptr": "*i64", "count_ptr": "*fp32"},
        {
            "BLOCK_P": 256,
            "BLOCK_BOXES": 8,
        },
    )


def _feature_augment_cases():
    import triton.language as tl
    from sokd.kernels.feature_augment import NO_OP, _feature_augment_kernel

    from sokd.augment_ops import AFFINE_OPS, CHANNEL_DROP, CHANNEL_SHUFFLE, CUTOUT

    def draw_type(op):
        if op in (CUTOUT, CHANNEL_SHUFFLE):
            return "*i64"
        return "*fp32" if op == CHANNEL_DROP else None

    variants = [
        ("bf16", tl.float32, pair) for pair in [(0, 4), (6, 0), (8, 7), (5, 6), (3, NO_OP)]
    ] + [("fp64", tl.float64, (6, 0))]
    for element, acc, (op_a, op_b) in variants:
        types = {
            "x_ptr": f"*{element}",
            "out_ptr": f"*{element}",
            "params_ptr": "*fp32",
            "seed_a": "i64",
            "seed_b": "i64",
        }
        constexprs = {
            "OP_A": op_a,
            "OP_B": op_b,
            "AFFINE_A": op_a in AFFINE_OPS,
            "AFFINE_B": op_b in AFFINE_OPS,
            "ACC_TYPE": acc,
            "BLOCK": 1024,
        }
        for name, op in (("draw_a_ptr", op_a), ("draw_b_ptr", op_b)):
            if draw_type(op) is None:
                constexprs[name] = None
            else:
                types[name] = draw_type(op)
        yield _feature_augment_kernel, types, constexprs


def compile_every_kernel():
    cases = [*_loss_cases(), *_interest_map_cases(), *_feature_augment_cases()]
    for kernel, types, constexprs in cases:
        try:
            _compile(kernel, types, constexprs)
        except Exception as error:
            raise AssertionError(f"{kernel.__name__} {constexprs} failed to compile") from error
    print(f"compiled {len(cases)} kernel variants for sm_{TARGET_ARCH}")


@pytest.mark.slow
def test_every_kernel_compiles_for_hopper(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    script = (
        f"import sys; sys.path.insert(0, {here!r}); "
        "import test_triton_compile; test_triton_compile.compile_every_kernel()"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        # Outside the checkout, so the child imports the installed sokd with its sokd.kernels.
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
