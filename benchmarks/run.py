"""Compare sokd's kernels with the eager reference, torch.compile and common KD code.

    python benchmarks/run.py --quick                 # the small default, about a minute on a CPU
    python benchmarks/run.py                         # the presets that suit the device
    python benchmarks/run.py --preset cifar --json out.json --plot out.png
    python benchmarks/run.py --shape N=8,C=16,H=8,W=8,K=10 --device cpu

Every contender's loss and gradients are checked against the eager reference before it is
timed; one that disagrees is reported as wrong and not timed.
"""

import argparse
import datetime
import json
import logging
import os
import platform
import sys

import report
import step
import suite
import torch
from cases import CASE_NAMES
from measure import Budget
from shapes import GPU_ONLY_PRESETS, PRESETS, QUICK_SHAPE, SHAPE_SYNTAX, parse_shape

import sokd

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FULL_BUDGET = Budget(warmup=1, min_reps=5, max_reps=200, budget_s=1.0)
OUTPUT_OPTIONS = ("--json", "--markdown", "--plot")
QUICK_BUDGET = Budget(warmup=0, min_reps=3, max_reps=50, budget_s=0.1, slow_reps=1)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def _threads(device):
    return torch.get_num_threads() if device.type == "cpu" else None


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    parser.add_argument(
        "--preset",
        action="append",
        choices=sorted([*PRESETS, step.PRESET]),
        help="a named shape; repeat for several (default: every preset that runs on the device)",
    )
    parser.add_argument(
        "--shape",
        action="append",
        type=_shape_argument,
        metavar="SHAPE",
        help=f"a custom shape, {SHAPE_SYNTAX}; repeat for several",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a small CIFAR-like shape ({QUICK_SHAPE.describe()}) and short "
        "timing, unless --preset or --shape say otherwise",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available)",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU threads for torch (default 1: a multi-threaded op on a shared or busy "
        "machine waits for time slices, and its timings swing by orders of magnitude)",
    )
    parser.add_argument(
        "--case",
        action="append",
        choices=CASE_NAMES,
        dest="cases",
        help="measure only this case; repeat for several (default: all)",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="leave out torch.compile, whose first compile of each case takes "
        "seconds to minutes on a CPU",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the results as markdown")
    parser.add_argument(
        "--plot", metavar="PATH", help="write a PNG bar chart of speed-ups (needs matplotlib)"
    )
    args = parser.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.threads <= 0:
        parser.error(f"--threads must be > 0, got {args.threads}")
    return args


def _shape_argument(text):
    try:
        return parse_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def selected_shapes(args):
    """([(name, Shape)] to run, [(name, why skipped)])."""
    shapes, skipped = [], []
    names = args.preset
    if names is None and not args.shape:
        names = [] if args.quick else list(PRESETS)
        if args.quick:
            shapes.append(("quick", QUICK_SHAPE))
    for name in names or []:
        if name in GPU_ONLY_PRESETS and args.device.type != "cuda":
            skipped.append((name, "GPU only: too large to be useful on a CPU"))
        else:
            shapes.append((name, PRESETS[name]))
    for index, shape in enumerate(args.shape or []):
        shapes.append((f"custom{index + 1}" if len(args.shape) > 1 else "custom", shape))
    return shapes, skipped


def _measuring_command(argv):
    """The command line that reproduces the measurement, without the output paths."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in OUTPUT_OPTIONS:
            skip_next = True
        elif arg.split("=", 1)[0] not in OUTPUT_OPTIONS:
            kept.append(arg)
    return " ".join(["python benchmarks/run.py"] + kept)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--preset", "llm"]:  # its own runner: benchmarks/llm.py
        import llm

        return llm.main(argv[2:])
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.preset and step.PRESET in args.preset:
        command = _measuring_command(sys.argv[1:] if argv is None else argv)
        return step.main(args, command, _device_name(args.device))
    # Graph breaks in the compiled SoKDLoss step (its policy draws a Python int) are expected;
    # dynamo's advice about them would bury the progress lines.
    torch._logging.set_logs(dynamo=logging.ERROR)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shapes, skipped_presets = selected_shapes(args)
    budget = QUICK_BUDGET if args.quick else FULL_BUDGET
    for name, reason in skipped_presets:
        print(f"preset {name} skipped: {reason}", file=sys.stderr)

    def compile_skip_reason(case):
        if args.no_compile:
            return "left out by --no-compile"
        if args.quick and case.slow_to_compile:
            return "left out by --quick: compiling the whole step takes over a minute on a CPU"
        return None

    results = suite.run(
        shapes,
        args.device,
        DTYPES[args.dtype],
        budget,
        set(args.cases or CASE_NAMES),
        compile_skip_reason,
    )
    run = {
        "schema_version": 1,
        "date": started,
        "machine": {
            "device": args.device.type,
            "device_name": _device_name(args.device),
            "threads": _threads(args.device),
            "cores": os.cpu_count(),
            # Other work on the machine slows every contender alike; this says how much
            # there was.
            "load_average_1min": load_before,
        },
        "software": {
            "sokd": sokd.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            "dtype": args.dtype,
            "quick": args.quick,
            "compile": not args.no_compile,
            "budget": {
                "warmup": budget.warmup,
                "min_reps": budget.min_reps,
                "max_reps": budget.max_reps,
                "budget_s": budget.budget_s,
            },
        },
        "backends_available": sokd.available_backends(),
        "skipped_presets": [{"preset": n, "reason": r} for n, r in skipped_presets],
        "results": results,
    }
    print(report.text_table(run))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(run, out, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(
                report.markdown(run, _measuring_command(sys.argv[1:] if argv is None else argv))
            )
    if args.plot:
        problem = report.plot(run, args.plot)
        if problem is None:
            print(f"plot written to {args.plot}", file=sys.stderr)
        else:
            print(f"--plot: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
