"""Validate sokd on a GPU machine end to end, in one command:

    python benchmarks/validate_gpu.py                  # summary in benchmarks/results/
    python benchmarks/validate_gpu.py --out DIR --stage parity --stage tests

Stages, each in its own subprocess under its own deadline (about 9 minutes in all on one H100
or H200). Every stage runs even when an earlier one failed, and the summary (markdown and JSON)
is rewritten after every stage, so it exists whatever happens:

  build      build sokd._C with nvcc for the device's compute capability
  parity     every op on every GPU backend against the reference: float32, bfloat16 and
             float16, forward and backward, at the benchmark presets
  sanitizer  compute-sanitizer memcheck and racecheck over the CUDA kernels
  large      one case beyond 2^31 elements per loss and GPU backend
  compile    torch.compile(fullgraph=True) of the native ops, forward and backward
  benchmark  the benchmark table (benchmarks/run.py) with the device named and the share of a
             same-size copy's bandwidth, written next to the summary
  tests      the GPU subset of the tests (marker `gpu`, and the modules that run on CUDA)

Without a GPU it is a smoke test: the stages that need one are skipped and say so, and the
summary is still written. The exit status is 1 when a stage failed or ran out of time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
TOTAL_BUDGET_S = 540
# The modules whose tests run on CUDA tensors when a GPU is present, beside the `gpu` marker.
GPU_TEST_MODULES = (
    "tests/test_gpu_ready.py",
    "tests/test_triton.py",
    "tests/test_native.py",
    "tests/test_numerics.py",
)


@dataclasses.dataclass
class StageResult:
    name: str
    status: str  # passed, failed, timed out, skipped
    seconds: float = 0.0
    detail: str = ""
    command: str = ""


@dataclasses.dataclass
class Stage:
    name: str
    deadline_s: int
    needs_gpu: bool
    run: Callable[[argparse.Namespace, float], StageResult]
    about: str


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(name: str, command: list[str], timeout: float, env: dict | None = None) -> StageResult:
    """Run `command` with a deadline; its exit status decides the stage."""
    started = time.monotonic()
    shown = " ".join(command)
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=max(1.0, timeout),
        )
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"") + (expired.stderr or b"")
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        return StageResult(
            name, "timed out", time.monotonic() - started,
            f"deadline of {timeout:.0f} s passed\n{_tail(output)}", shown,
        )
    status = "passed" if done.returncode == 0 else "failed"
    detail = _tail(done.stdout + "\n" + done.stderr)
    return StageResult(name, status, time.monotonic() - started, detail, shown)


def _worker(name: str, timeout: float, *extra: str) -> StageResult:
    return _run(name, [sys.executable, str(pathlib.Path(__file__)), "--worker", name, *extra],
                timeout)


# Stages run by this process ------------------------------------------------------------------


def _device_arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def stage_build(args, timeout):
    if shutil.which("nvcc") is None:
        return StageResult("build", "failed", detail="nvcc is not on PATH")
    env = {
        "SOKD_CUDA": "1",
        "TORCH_CUDA_ARCH_LIST": _device_arch(),
        "MAX_JOBS": str(os.cpu_count() or 4),
    }
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
               "--no-build-isolation", "-e", "."]
    result = _run("build", command, timeout, env)
    result.command = " ".join(f"{k}={v}" for k, v in env.items()) + " " + result.command
    if result.status == "passed":
        check = _run("build", [sys.executable, "-c",
                               "import sokd; b = sokd.available_backends(); print(b); "
                               "assert 'cuda' in b, 'the cuda backend did not load'"], 60)
        if check.status != "passed":
            return dataclasses.replace(result, status="failed", detail=check.detail)
    return result


def stage_parity(args, timeout):
    return _worker("parity", timeout)


def stage_sanitizer(args, timeout):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        candidate = pathlib.Path(cuda_home) / "bin" / "compute-sanitizer"
        sanitizer = str(candidate) if candidate.exists() else None
    if sanitizer is None:
        return StageResult("sanitizer", "failed", detail="compute-sanitizer not found")
    results = []
    # Both tools at once: each is slow to start, and they share the deadline.
    processes = {}
    started = time.monotonic()
    for tool in ("memcheck", "racecheck"):
        command = [sanitizer, "--tool", tool, "--error-exitcode", "1",
                   sys.executable, str(pathlib.Path(__file__)), "--worker", "sanitized"]
        # Without PyTorch's caching allocator every tensor is its own allocation, so memcheck
        # sees a read past a tensor's end instead of into a neighbour in the same block.
        env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        processes[tool] = (command, subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    status, details = "passed", []
    for tool, (command, process) in processes.items():
        left = max(1.0, timeout - (time.monotonic() - started))
        try:
            output, _ = process.communicate(timeout=left)
            outcome = "passed" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            outcome = "timed out"
        if outcome != "passed" and status == "passed":
            status = outcome
        details.append(f"{tool}: {outcome}\n{_tail(output, 15)}")
        results.append(" ".join(command))
    return StageResult("sanitizer", status, time.monotonic() - started, "\n".join(details),
                       " ; ".join(results))


def stage_large(args, timeout):
    return _worker("large", timeout)


def stage_compile(args, timeout):
    return _worker("compile", timeout)


def stage_benchmark(args, timeout):
    stamp = datetime.date.today().isoformat()
    base = pathlib.Path(args.out) / f"gpu-{stamp}"
    command = [sys.executable, "benchmarks/run.py", "--device", "cuda", "--no-compile",
               "--markdown", f"{base}.md", "--json", f"{base}.json"]
    result = _run("benchmark", command, timeout)
    if result.status == "passed":
        result.detail = f"table: {base}.md, {base}.json\n" + result.detail
    return result


def stage_tests(args, timeout):
    marked = _run("tests", [sys.executable, "-m", "pytest", "-q", "-x", "-m", "gpu", "tests"],
                  timeout / 3)
    started = time.monotonic()
    modules = _run("tests", [sys.executable, "-m", "pytest", "-q", "-m", "not slow",
                             *GPU_TEST_MODULES], timeout - marked.seconds)
    # pytest exits 5 when the marker selects nothing, which is not a failure.
    marked_ok = marked.status == "passed" or "no tests ran" in marked.detail
    status = "passed" if marked_ok and modules.status == "passed" else (
        "timed out" if "timed out" in (marked.status, modules.status) else "failed")
    return StageResult(
        "tests", status, marked.seconds + time.monotonic() - started,
        f"-m gpu: {marked.status}\n{_tail(marked.detail, 10)}\n"
        f"modules: {modules.status}\n{_tail(modules.detail, 20)}",
        f"{marked.command} ; {modules.command}",
    )


STAGES = (
    Stage("build", 150, True, stage_build, "sokd._C built with nvcc for the device's arch"),
    Stage("parity", 80, True, stage_parity,
          "every op x GPU backend x float32/bfloat16/float16 against the reference, fwd+bwd"),
    Stage("sanitizer", 50, True, stage_sanitizer, "compute-sanitizer memcheck and racecheck"),
    Stage("large", 30, True, stage_large, "one case beyond 2^31 elements per loss and backend"),
    Stage("compile", 40, True, stage_compile, "torch.compile(fullgraph=True) of the native ops"),
    Stage("benchmark", 140, True, stage_benchmark,
          "benchmarks/run.py table with device and share of copy bandwidth"),
    Stage("tests", 50, True, stage_tests, "pytest -m gpu and the modules that run on CUDA"),
)


# Workers: run in a subprocess by the stages above --------------------------------------------


def _gpu_backends():
    import sokd

    return [name for name in ("cuda", "triton") if name in sokd.available_backends()]


def _close(actual, expected, dtype, what):
    """Problems with `actual` against the reference's `expected`, as a list of strings."""
    import torch

    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return [f"{what}: {actual.shape}/{actual.dtype} against {expected.shape}/{expected.dtype}"]
    if not actual.is_floating_point():
        return [] if torch.equal(actual, expected) else [f"{what}: differs"]
    actual, expected = actual.double(), expected.double()
    same_nan = torch.isnan(actual) == torch.isnan(expected)
    if not same_nan.all():
        return [f"{what}: NaN where the reference has none (or the reverse)"]
    # One rounding of the half types, float32 sums in another order.
    relative = {torch.float32: 1e-4, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    scale = expected.nan_to_num().abs().max().item() if expected.numel() else 0.0
    allowed = relative * expected.abs() + 1e-5 * scale
    error = (actual - expected).abs().nan_to_num()
    if (error > allowed).any():
        return [f"{what}: max error {error.max().item():.3g} (scale {scale:.3g})"]
    return []


def _parity_cases(shape, dtype, device):
    """(op name, function of the backend, inputs that want gradients) at one preset."""
    import torch

    from sokd import ops
    from sokd.augment_ops import CHANNEL_DROP, CHANNEL_SHUFFLE, CUTOUT, ROTATE, SHEAR_X, TRANSLATE_X

    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=generator, device=device) * scale).to(dtype)

    logits = shape.logit_shape()
    student, teacher = randn(*logits, scale=3), randn(*logits, scale=3)
    class_mask = torch.rand(logits, generator=generator, device=device) < 0.1
    weight_shape = (logits[0],) + tuple(logits[2:])
    weight = torch.rand(weight_shape, generator=generator, device=device)
    cases = [
        ("kd_loss", lambda s: ops.kd_loss(s, teacher, 4.0), [student]),
        ("kd_loss weighted", lambda s: ops.kd_loss(s, teacher, 4.0, weight), [student]),
        ("decoupled_kd_loss",
         lambda s: ops.decoupled_kd_loss(s, teacher, class_mask, 1.0, 8.0, 4.0), [student]),
    ]
    if shape.has_features:
        features = shape.feature_shape()
        fs, ft = randn(*features), randn(*features)
        mask = torch.rand(features[0], *features[2:], generator=generator, device=device)
        cases.append(("masked_feature_loss",
                      lambda s, t: ops.masked_feature_loss(s, t, mask, "mask"), [fs, ft]))
        heat = torch.rand(features[0], 1, *features[2:], generator=generator, device=device)
        wh = torch.rand(features[0], 2, *features[2:], generator=generator, device=device) * 8
        offset = torch.rand(features[0], 2, *features[2:], generator=generator, device=device)
        cases.append(("interest_map",
                      lambda: ops.interest_map(heat.to(dtype), wh.to(dtype), offset.to(dtype),
                                               8, 3), []))
        # Noise is left out: each backend draws its own (same statistics, other values).
        for pair in ((SHEAR_X, ROTATE), (CUTOUT, CHANNEL_DROP), (TRANSLATE_X, CHANNEL_SHUFFLE)):
            magnitudes = torch.tensor([0.3, 0.7], device=device)

            def augment(pair=pair, magnitudes=magnitudes):
                draws = torch.Generator(device=device).manual_seed(1)
                return ops.feature_augment(fs, list(pair), magnitudes, draws)

            cases.append((f"feature_augment {pair}", augment, []))
    return cases


def _evaluate(function, inputs):
    """Outputs (as a tuple) and the gradients of the inputs."""
    import torch

    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    outputs = function(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = torch.autograd.grad(outputs[0], leaves) if leaves else ()
    return tuple(o.detach() for o in outputs), grads


def worker_parity(device_name="cuda", tiny=False):
    """The parity stage. On a CPU (`--worker-device cpu --tiny`, the smoke test) the same
    checks run on the cpu backend and the Triton interpreter at tiny shapes."""
    import torch

    import sokd
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from shapes import PRESETS, Shape

    device = torch.device(device_name)
    if device.type == "cuda":
        backends = _gpu_backends()
        print(f"device {torch.cuda.get_device_name()}; backends {backends}")
    else:
        backends = [name for name in ("cpu", "triton") if name in sokd.available_backends()]
    # Beside the presets: few long rows, which the CUDA kernels give a block each (one with
    # 16-byte loads, one with an odd K that cannot have them).
    presets = {**PRESETS, "long-rows": Shape(n=8, k=32768), "long-odd-rows": Shape(n=8, k=50257)}
    if tiny:
        presets = {"tiny": Shape(n=3, c=4, h=5, w=6, k=7),
                   "tiny-dense": Shape(n=2, c=3, h=4, w=5, k=6, dense=True)}
    failures, checked = [], 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for preset, shape in presets.items():
            for name, function, inputs in _parity_cases(shape, dtype, device):
                sokd.set_backend("reference")
                expected = _evaluate(function, inputs)
                for backend in backends:
                    sokd.set_backend(backend)
                    where = f"{name} [{backend}, {preset}, {dtype}]"
                    try:
                        actual = _evaluate(function, inputs)
                    except Exception as error:  # a crash is a finding, not the end
                        failures.append(f"{where}: {type(error).__name__}: {error}")
                        continue
                    checked += 1
                    for index, (a, e) in enumerate(zip(actual[0] + actual[1],
                                                       expected[0] + expected[1])):
                        failures += _close(a, e, dtype, f"{where} output {index}")
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"{dtype} {preset}: {checked} checks so far, {len(failures)} failures",
                  flush=True)
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


def worker_sanitized():
    """Every CUDA kernel once at small odd shapes: what compute-sanitizer watches."""
    import torch

    import sokd
    from sokd import ops

    if "cuda" not in sokd.available_backends():
        print("the cuda backend is not built")
        return 1
    sokd.set_backend("cuda")
    device = "cuda"
    for logits in ((5, 7), (3, 1000), (2, 19, 9, 7)):
        student = torch.randn(logits, device=device, requires_grad=True)
        teacher = torch.randn(logits, device=device)
        weight = torch.rand((logits[0],) + logits[2:], device=device)
        ops.kd_loss(student, teacher, 2.0, weight).backward()
        mask = torch.rand(logits, device=device) < 0.3
        ops.decoupled_kd_loss(student, teacher, mask).backward()
    features = torch.randn(3, 5, 9, 7, device=device, requires_grad=True)
    ops.masked_feature_loss(features, torch.randn(3, 5, 9, 7, device=device),
                            torch.rand(3, 9, 7, device=device), "mask").backward()
    heat = torch.rand(3, 2, 9, 7, device=device)
    ops.interest_map(heat, heat * 4, heat, k=5, kernel=3)
    for pair in ((0, 4), (5, 7), (2, 6), (8, 1)):
        ops.feature_augment(features.detach(), list(pair), torch.tensor([0.3, 0.7], device=device))
    torch.cuda.synchronize()
    print("every CUDA kernel ran")
    return 0


def worker_large():
    """Beyond 2^31 elements: values whose exact loss and gradient are known."""
    import torch

    import sokd
    from sokd import ops

    elements = 2**31 + 2**20
    failures = []
    for backend in _gpu_backends():
        sokd.set_backend(backend)
        # One image of C x H x W > 2^31: channel offsets pass 32 bits inside the image.
        channels = elements // 2**20 + 1
        student = torch.full((1, channels, 1024, 1024), 0.5, device="cuda",
                             dtype=torch.bfloat16, requires_grad=True)
        teacher = torch.zeros((1, channels, 1024, 1024), device="cuda", dtype=torch.bfloat16)
        loss = ops.masked_feature_loss(student, teacher)
        (grad,) = torch.autograd.grad(loss, student)
        expected_grad = torch.tensor(1.0 / student.numel()).bfloat16()  # 2 * 0.5 / numel
        if abs(loss.item() - 0.25) > 1e-4:
            failures.append(f"masked_feature_loss [{backend}]: loss {loss.item()} != 0.25")
        ends = torch.stack([grad.flatten()[0], grad.flatten()[-1]]).cpu()
        if not torch.equal(ends, expected_grad.repeat(2)):
            failures.append(f"masked_feature_loss [{backend}]: gradient ends {ends.tolist()}")
        del student, teacher, grad
        # N x K logits with N * K > 2^31: row offsets pass 32 bits. bfloat16, as the gradient
        # of one row among 65569 is below float16's smallest subnormal.
        classes = 32768
        rows = elements // classes + 1
        pattern_s = torch.randn(1, classes, device="cuda")
        pattern_t = torch.randn(1, classes, device="cuda")
        sokd.set_backend("reference")
        one_row = pattern_s.bfloat16().float().requires_grad_()
        row_loss = ops.kd_loss(one_row, pattern_t.bfloat16().float(), 4.0)
        (row_grad,) = torch.autograd.grad(row_loss, one_row)
        sokd.set_backend(backend)
        student = pattern_s.bfloat16().repeat(rows, 1).requires_grad_()
        loss = ops.kd_loss(student, pattern_t.bfloat16().repeat(rows, 1), 4.0)
        (grad,) = torch.autograd.grad(loss, student)
        expected_loss = row_loss.detach()
        if abs(loss.item() - expected_loss.item()) > 1e-3 * abs(expected_loss.item()) + 1e-6:
            failures.append(f"kd_loss [{backend}]: loss {loss.item()} != {expected_loss.item()}")
        last = grad[-1].float() * rows
        error = (last - row_grad[0]).abs().max().item()
        if error > 1e-2 * row_grad.abs().max().item():
            failures.append(f"kd_loss [{backend}]: last row's gradient off by {error:.3g}")
        del student, grad
        torch.cuda.empty_cache()
        print(f"{backend}: beyond 2^31 checked", flush=True)
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


def worker_compile():
    import torch

    import sokd
    from sokd import ops

    failures = []
    for backend in _gpu_backends():
        sokd.set_backend(backend)

        def step(s, t, fs, ft, mask):
            return (ops.kd_loss(s, t, 4.0)
                    + ops.decoupled_kd_loss(s, t, mask)
                    + ops.masked_feature_loss(fs, ft))

        compiled = torch.compile(step, fullgraph=True)
        for batch in (8, 6):  # a smaller last batch: dynamic shapes
            s = torch.randn(batch, 100, device="cuda", requires_grad=True)
            t = torch.randn(batch, 100, device="cuda")
            fs = torch.randn(batch, 16, 8, 8, device="cuda", requires_grad=True)
            ft = torch.randn(batch, 16, 8, 8, device="cuda")
            mask = torch.rand(batch, 100, device="cuda") < 0.2
            try:
                got = compiled(s, t, fs, ft, mask)
                got_grads = torch.autograd.grad(got, (s, fs))
            except Exception as error:
                failures.append(f"{backend} batch {batch}: {type(error).__name__}: {error}")
                break
            want = step(s, t, fs, ft, mask)
            want_grads = torch.autograd.grad(want, (s, fs))
            for a, e in zip((got,) + got_grads, (want,) + want_grads):
                failures += _close(a, e, torch.float32, f"{backend} batch {batch}")
        print(f"{backend}: compiled", flush=True)
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


WORKERS = {
    "parity": worker_parity,
    "sanitized": worker_sanitized,
    "large": worker_large,
    "compile": worker_compile,
}


# Summary ---------------------------------------------------------------------------------------


def _environment():
    info = {"python": sys.version.split()[0], "gpu": None}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["compute_capability"] = _device_arch()
    except Exception as error:
        info["torch"] = f"not importable: {error}"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    return info


def write_summary(out: pathlib.Path, environment, results, started, finished=False):
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "schema_version": 1,
        "started": started,
        "finished": finished,
        "command": "python benchmarks/validate_gpu.py " + " ".join(sys.argv[1:]),
        "environment": environment,
        "stages": [dataclasses.asdict(result) for result in results],
    }
    (out / "gpu-validation.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# GPU validation",
        "",
        f"- started: {started}{'' if finished else ' (still running or interrupted)'}",
        f"- device: {environment.get('gpu') or 'none (smoke run)'}",
        f"- torch {environment.get('torch')}, CUDA {environment.get('cuda')}, "
        f"triton {environment.get('triton')}, python {environment.get('python')}",
        f"- command: `{summary['command'].strip()}`",
        "",
        "| stage | status | seconds | what |",
        "|---|---|---|---|",
    ]
    about = {stage.name: stage.about for stage in STAGES}
    for result in results:
        lines.append(f"| {result.name} | {result.status} | {result.seconds:.1f} | "
                     f"{about.get(result.name, '')} |")
    for result in results:
        if result.detail:
            lines += ["", f"## {result.name}: {result.status}", ""]
            if result.command:
                lines += [f"`{result.command}`", ""]
            lines += ["```text", result.detail, "```"]
    (out / "gpu-validation.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder for the summary and the benchmark table "
                             "(default: benchmarks/results)")
    parser.add_argument("--stage", action="append", choices=[s.name for s in STAGES],
                        help="run only this stage; repeat for several (default: all)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "parity":
        return worker_parity(args.worker_device, args.tiny)
    if args.worker:
        return WORKERS[args.worker]()

    started_at = time.monotonic()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = pathlib.Path(args.out)
    environment = _environment()
    has_gpu = environment.get("gpu") is not None
    results: list[StageResult] = []
    write_summary(out, environment, results, started)
    for stage in STAGES:
        if args.stage and stage.name not in args.stage:
            continue
        if stage.needs_gpu and not has_gpu:
            result = StageResult(stage.name, "skipped", detail="no CUDA device: needs a GPU")
        else:
            left = TOTAL_BUDGET_S - (time.monotonic() - started_at)
            timeout = min(stage.deadline_s, max(left, 0))
            print(f"[{stage.name}] up to {timeout:.0f} s: {stage.about}", flush=True)
            stage_started = time.monotonic()
            try:
                result = (stage.run(args, timeout) if timeout > 0 else StageResult(
                    stage.name, "timed out", detail="no time left of the total budget"))
            except Exception:  # the next stages still run
                result = StageResult(stage.name, "failed", detail=traceback.format_exc())
            result.seconds = time.monotonic() - stage_started
        print(f"[{stage.name}] {result.status}" + (f": {result.detail.splitlines()[0]}"
                                                   if result.status == "skipped" else ""),
              flush=True)
        results.append(result)
        write_summary(out, environment, results, started)
    write_summary(out, environment, results, started, finished=True)
    print(f"summary: {out / 'gpu-validation.md'} and {out / 'gpu-validation.json'}")
    return 1 if any(r.status in ("failed", "timed out") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
