"""What the router of sokd/native.py costs per call, measured on the CPU.

On CUDA tensors every kernel op passes through a Python router that asks the backend selection
whether the Triton launcher or the C++ kernel runs. On CPU tensors the C++ kernel sits at the
CPU key directly, except under TRITON_INTERPRET=1, where the same router is placed there too.
Timing one op on the cpu backend both ways, in two fresh processes, isolates the router's cost
(its Python call, the selection, and the boxed call of the C++ kernel): the kernel underneath is
the same. A GPU call pays the same Python work; no GPU has timed it yet.

    python benchmarks/router_overhead.py                 # kd_loss, 64 x 100 logits
    python benchmarks/router_overhead.py --rows 8 --classes 10 --calls 20000
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import sokd

MEASURE = """
import json, sys, time, torch, sokd
torch.set_num_threads(1)
sokd.set_backend("cpu")
rows, classes, calls, rounds = (int(v) for v in sys.argv[1:5])
generator = torch.Generator().manual_seed(0)
student = torch.randn(rows, classes, generator=generator, requires_grad=True)
teacher = torch.randn(rows, classes, generator=generator)

def forward():
    with torch.no_grad():
        sokd.ops.kd_loss(student, teacher, 4.0)

def forward_with_grad():
    return sokd.ops.kd_loss(student, teacher, 4.0)

cpu_row = [line for line in torch._C._dispatch_dump_table("sokd::kd_loss").splitlines()
           if line.startswith("CPU:")]
result = {"routed": "sokd/native.py" in cpu_row[0]}
for _ in range(calls // 10):
    forward()
    forward_with_grad().backward()
# Timed call by call, so that a forward with grad and its backward are told apart.
kinds = ("forward, no grad", "forward, with grad", "backward")
result.update((kind, []) for kind in kinds)
for _ in range(rounds):
    totals = dict.fromkeys(kinds, 0.0)
    for _ in range(calls):
        start = time.perf_counter()
        forward()
        middle = time.perf_counter()
        loss = forward_with_grad()
        split = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        totals["forward, no grad"] += middle - start
        totals["forward, with grad"] += split - middle
        totals["backward"] += end - split
    for name, total in totals.items():
        result[name].append(total / calls * 1e6)
print(json.dumps(result))
"""


def _measure(interpreted: bool, rows: int, classes: int, calls: int, rounds: int) -> dict:
    """Timings from a fresh process that imports the sokd this one imports (not a ./sokd
    source folder without the extension, which a process started in the checkout would)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpreted:
        env["TRITON_INTERPRET"] = "1"
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(sokd.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH"))))
    child = subprocess.run(
        [sys.executable, "-c", MEASURE, str(rows), str(classes), str(calls), str(rounds)],
        env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True,
    )
    if child.returncode != 0:
        raise SystemExit(f"the timing process failed:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--calls", type=int, default=5000, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per process")
    args = parser.parse_args()
    shape = (args.rows, args.classes, args.calls, args.rounds)
    # Alternate the two processes, so that a change of machine load hits both alike.
    direct, routed = {}, {}
    for _ in range(2):
        for target, interpreted in ((direct, False), (routed, True)):
            timings = _measure(interpreted, *shape)
            if timings.pop("routed") != interpreted:
                raise SystemExit("the CPU key of sokd::kd_loss is not what this comparison "
                                 "needs: is the installed sokd built with sokd._C?")
            for name, values in timings.items():
                target.setdefault(name, []).extend(values)
    print(f"kd_loss on {args.rows} x {args.classes} float32 logits, cpu backend, 1 thread; "
          "median us per call")
    print("| call | C++ kernel at the CPU key | through the router | router cost |")
    print("|---|---|---|---|")
    for name in direct:
        plain, through = statistics.median(direct[name]), statistics.median(routed[name])
        print(f"| {name} | {plain:.1f} | {through:.1f} | {through - plain:+.1f} |")


if __name__ == "__main__":
    main()
