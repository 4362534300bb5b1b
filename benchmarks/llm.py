"""The `llm` preset: logit distillation for language models (docs/algorithm.md §7).

    python benchmarks/run.py --preset llm --threads 1 --markdown out.md --json out.json
    python benchmarks/run.py --preset llm --quick          # small shapes, seconds

Row loss: forward + backward of one divergence at N x V (default 4096 x 32000), fp32:
eager PyTorch of the same formula, torch.compile of it, sokd's op on the selected backend,
and Liger-Kernel's fused losses where they are installed and can run on the device.
LM head: fused_linear_distill_loss against the unfused eager path (N x D hidden states,
V x D weights, logits materialised) at N, D, V = 4096, 1024, 32000.

The machine may be shared: contenders are timed in turns (one run of each, repeated), and
ratios are taken within one run. Every contender's loss and gradient are checked against
sokd's reference before timing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from measure import compare, peak_extra_bytes

import sokd
from sokd.ops import fused_linear_distill_loss, logit_distill_loss

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
BETA = 0.5


def eager_divergence(student, teacher, divergence, temperature=1.0):
    """The formula as a training loop writes it in PyTorch: log-softmaxes and kl_div."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    if divergence == "forward_kl":
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    if divergence == "reverse_kl":
        return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    log_m = torch.logsumexp(
        torch.stack([log_p + torch.log(torch.tensor(BETA)),
                     log_q + torch.log(torch.tensor(1 - BETA))]), dim=0
    )
    return BETA * F.kl_div(log_m, log_p, reduction="batchmean", log_target=True) + (
        1 - BETA
    ) * F.kl_div(log_m, log_q, reduction="batchmean", log_target=True)


def _liger_row_loss(divergence, device):
    """A Liger-Kernel row loss for `divergence`, or (None, reason)."""
    try:
        import liger_kernel.transformers as liger
    except ImportError as error:
        return None, f"liger_kernel is not installed ({error})"
    if device.type != "cuda":
        return None, "Liger-Kernel's losses are Triton kernels for GPUs"
    if divergence == "jsd":
        jsd = liger.LigerJSD(beta=BETA)
        return (lambda s, t: jsd(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1))), None
    if divergence == "forward_kl":
        kl = liger.LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return (lambda s, t: kl(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1))), None
    return None, "Liger-Kernel has no reverse KL loss"


def _row_contenders(divergence, device, use_compile):
    def sokd_op(s, t):
        return logit_distill_loss(s, t, divergence=divergence, beta=BETA)

    contenders = {
        "eager": lambda s, t: eager_divergence(s, t, divergence),
        "sokd": sokd_op,
    }
    skipped = {}
    if use_compile:
        contenders["torch.compile"] = torch.compile(
            lambda s, t: eager_divergence(s, t, divergence)
        )
    liger, reason = _liger_row_loss(divergence, device)
    if liger is None:
        skipped["liger"] = reason
    else:
        contenders["liger"] = liger
    return contenders, skipped


def _timed(step, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - begin


def _interleaved(steps, device, reps):
    """Median seconds per step, timing one run of each contender in turn."""
    times = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up (and compile) once each
        step()
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(_timed(step, device))
    return {name: statistics.median(values) for name, values in times.items()}


def _check(steps, expected, dtype):
    wrong = {}
    for name, step in steps.items():
        problem = compare(step(), expected, dtype, tolerance_scale=5.0)
        if problem is not None:
            wrong[name] = problem
    return wrong


def row_loss_case(rows, vocab, divergence, device, dtype, reps, use_compile):
    generator = torch.Generator(device="cpu").manual_seed(0)
    student = (torch.randn(rows, vocab, generator=generator) * 2).to(device, dtype)
    teacher = (torch.randn(rows, vocab, generator=generator) * 2).to(device, dtype)
    contenders, skipped = _row_contenders(divergence, device, use_compile)

    def step_of(fn):
        def step():
            s = student.detach().requires_grad_(True)
            loss = fn(s, teacher)
            loss.backward()
            return loss.detach(), s.grad

        return step

    steps = {name: step_of(fn) for name, fn in contenders.items()}
    backend = sokd.get_backend()
    sokd.set_backend("reference")
    expected = step_of(lambda s, t: logit_distill_loss(s, t, divergence=divergence, beta=BETA))()
    sokd.set_backend(backend)
    wrong = _check(steps, expected, dtype)
    for name in wrong:
        steps.pop(name)
    medians = _interleaved(steps, device, reps)
    memory = {name: peak_extra_bytes(step, device) for name, step in steps.items()}
    return {
        "case": f"row loss {divergence}",
        "shape": {"N": rows, "V": vocab},
        "seconds": medians,
        "peak_extra_bytes": memory,
        "wrong": wrong,
        "skipped": skipped,
    }


def lm_head_case(rows, hidden, vocab, device, dtype, reps, use_compile, divergence="forward_kl"):
    generator = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(rows, hidden, generator=generator).to(device, dtype)
    th = torch.randn(rows, hidden, generator=generator).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).to(device, dtype)
    tw = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).to(device, dtype)

    def unfused(h_s, w_s):
        with torch.no_grad():
            teacher_logits = th @ tw.t()
        return eager_divergence(h_s @ w_s.t(), teacher_logits, divergence)

    def fused(h_s, w_s):
        return fused_linear_distill_loss(h_s, w_s, th, tw, divergence=divergence)

    def step_of(fn):
        def step():
            h_s = h.detach().requires_grad_(True)
            w_s = w.detach().requires_grad_(True)
            loss = fn(h_s, w_s)
            loss.backward()
            return loss.detach(), h_s.grad, w_s.grad

        return step

    contenders = {"eager": unfused, "sokd fused": fused}
    if use_compile:
        contenders["torch.compile"] = torch.compile(unfused)
    skipped = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD  # noqa: F401
    except ImportError as error:
        skipped["liger fused linear"] = f"liger_kernel is not installed ({error})"
    else:
        if device.type != "cuda":
            skipped["liger fused linear"] = "Liger-Kernel's losses are Triton kernels for GPUs"
    steps = {name: step_of(fn) for name, fn in contenders.items()}
    expected = steps["eager"]()
    wrong = _check({k: v for k, v in steps.items() if k != "eager"}, expected, dtype)
    for name in wrong:
        steps.pop(name)
    medians = _interleaved(steps, device, reps)
    memory = {name: peak_extra_bytes(step, device) for name, step in steps.items()}
    return {
        "case": f"LM head {divergence}",
        "shape": {"N": rows, "D": hidden, "V": vocab},
        "seconds": medians,
        "peak_extra_bytes": memory,
        "wrong": wrong,
        "skipped": skipped,
    }


def _ratio_line(result, baseline):
    seconds, memory = result["seconds"], result["peak_extra_bytes"]
    compiled = seconds.get("torch.compile")
    lines = []
    for name in seconds:
        speedup = seconds[baseline] / seconds[name]
        versus_compile = f"{compiled / seconds[name]:.2f}x" if compiled else "-"
        mem = memory[name] / max(memory[baseline], 1)
        lines.append(
            f"| {result['case']} | {name} | {seconds[name] * 1e3:.1f} | {speedup:.2f}x | "
            f"{versus_compile} | {memory[name] / 2**20:.0f} | {mem:.2f} |"
        )
    for name, why in result["wrong"].items():
        lines.append(f"| {result['case']} | {name} | wrong: {why} | | | | |")
    for name, why in result["skipped"].items():
        lines.append(f"| {result['case']} | {name} | not run: {why} | | | | |")
    return lines


def markdown(run, command):
    lines = [
        f"# llm preset, {run['machine']['device_name']}, {run['date']}",
        "",
        f"Command: `{command}`",
        "",
        f"torch {run['software']['torch']}, threads {run['machine']['threads']}, dtype "
        f"{run['settings']['dtype']}, load average before {run['machine']['load_average_1min']}."
        " Contenders were timed in turns within one run (median of the runs); peak extra memory"
        " is what one forward + backward allocates above what was live before it.",
        "",
        "| case | contender | ms | speed-up vs eager | vs torch.compile | peak extra MiB "
        "| memory vs eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in run["results"]:
        lines += _ratio_line(result, "eager")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and 3 runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, metavar="N")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per contender")
    parser.add_argument("--divergence", action="append", choices=DIVERGENCES)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-lm-head", action="store_true", help="skip the LM head case")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32
    if args.quick:
        row_shape, head_shape, reps = (256, 2000), (256, 128, 2000), 3
    elif device.type == "cuda":
        row_shape, head_shape, reps = (16384, 128256), (16384, 4096, 128256), 10
    else:
        row_shape, head_shape, reps = (4096, 32000), (4096, 1024, 32000), 5
    reps = args.reps or reps
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = []
    for divergence in args.divergence or DIVERGENCES:
        print(f"row loss {divergence} at N x V = {row_shape}", file=sys.stderr)
        results.append(row_loss_case(*row_shape, divergence, device, dtype, reps,
                                     not args.no_compile))
    if not args.no_lm_head:
        print(f"LM head at N x D x V = {head_shape}", file=sys.stderr)
        results.append(lm_head_case(*head_shape, device, dtype, max(2, reps // 2),
                                    not args.no_compile))
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or platform.machine())
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                models = [line.split(":", 1)[1].strip() for line in cpuinfo
                          if line.startswith("model name")]
            device_name = models[0] if models else device_name
        except OSError:
            pass
    run = {
        "schema_version": 1,
        "preset": "llm",
        "date": started,
        "machine": {
            "device": device.type,
            "device_name": device_name,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "load_average_1min": load_before,
        },
        "software": {"sokd": sokd.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "settings": {"dtype": "float32", "quick": args.quick, "reps": reps,
                     "backend": sokd.get_backend()},
        "results": results,
    }
    command = "python benchmarks/run.py --preset llm " + " ".join(
        a for i, a in enumerate(argv)
        if a not in ("--json", "--markdown") and (i == 0 or argv[i - 1] not in ("--json",
                                                                            "--markdown"))
    )
    text = markdown(run, command.strip())
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(run, out, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(text)
    return 0
