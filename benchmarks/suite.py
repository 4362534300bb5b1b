"""Runs every case for every shape and contender, and collects JSON-ready results."""

import sys
import time

import torch
from cases import CASES
from measure import compare, peak_extra_bytes, time_step

import sokd

NATIVE_BACKENDS = ("cpu", "cuda", "triton")


def backend_skip_reasons(device):
    """(name, None or why it is skipped) for each sokd backend other than reference."""
    available = sokd.available_backends()
    found = []
    for name in NATIVE_BACKENDS:
        if name == "triton" and device.type != "cuda":
            reason = "runs on CUDA tensors only (its CPU interpreter is for tests)"
        elif name in ("cpu", "cuda") and device.type != name:
            reason = f"runs on {name.upper()} tensors only"
        elif name not in available:
            reason = f"not available in this installation (sokd.available_backends() = {available})"
        else:
            reason = None
        found.append((name, reason))
    return found


class Progress:
    """One line per finished contender on stderr, numbered against the total."""

    def __init__(self, total, stream=sys.stderr):
        self.total = total
        self.done = 0
        self.stream = stream

    def report(self, label, outcome, seconds):
        self.done += 1
        print(
            f"[{self.done}/{self.total}] {label}: {outcome} [{seconds:.1f} s]",
            file=self.stream,
            flush=True,
        )


def _copy_roofline(num_bytes, device, budget):
    """Time a device-to-device copy that reads and writes num_bytes in all."""
    elements = max(num_bytes // 8, 1)
    source = torch.rand(elements, device=device)
    target = torch.empty_like(source)
    timing = time_step(lambda: target.copy_(source), device, budget)
    return {
        "median_s": timing.median_s,
        "iqr_s": timing.iqr_s,
        "gbps": 8 * elements / timing.median_s / 1e9,
        "unstable": timing.unstable,
    }


def _skipped(contender, reason, status="skipped"):
    return {
        "name": contender.name,
        "kind": contender.kind,
        "status": status,
        "reason": reason,
        "median_s": None,
        "iqr_s": None,
        "reps": 0,
        "unstable": None,
        "peak_extra_bytes": None,
        "gbps": None,
        "of_copy": None,
        "speedup_vs_eager": None,
        "speedup_vs_compile": None,
    }


def run_contender(contender, inputs, expected, device, dtype, budget, tolerance_scale):
    """(result entry, outputs of the check run) for one contender."""
    if contender.skip_reason is not None:
        return _skipped(contender, contender.skip_reason), None
    try:
        step = contender.prepare(inputs)
        outputs = step()
    except Exception as error:  # noqa: BLE001 - a contender that cannot run is reported
        return _skipped(contender, f"raised {type(error).__name__}: {error}", "wrong"), None
    mismatch = compare(outputs, outputs if expected is None else expected, dtype, tolerance_scale)
    if mismatch is not None:
        return _skipped(contender, mismatch, "wrong"), None
    entry = _skipped(contender, None, "ok")
    entry["peak_extra_bytes"] = peak_extra_bytes(step, device)
    timing = time_step(step, device, budget)
    entry.update(
        median_s=timing.median_s, iqr_s=timing.iqr_s, reps=timing.reps, unstable=timing.unstable
    )
    return entry, outputs


def _add_ratios(entries, num_bytes, copy):
    by_name = {entry["name"]: entry for entry in entries if entry["status"] == "ok"}
    for entry in by_name.values():
        for baseline, key in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
            if baseline in by_name:
                entry[key] = by_name[baseline]["median_s"] / entry["median_s"]
        if num_bytes is not None:
            entry["gbps"] = num_bytes / entry["median_s"] / 1e9
            entry["of_copy"] = copy["median_s"] / entry["median_s"]


def _compile_everything(case):
    return None


def planned_work(shapes, device, case_names, compile_skip_reason=_compile_everything):
    """[(preset, shape, case, contenders or None, skip reason)] in run order.

    compile_skip_reason(case) says why torch.compile is left out for a case, or None.
    """
    backends = backend_skip_reasons(device)
    plan = []
    for preset, shape in shapes:
        for case in CASES:
            if case.name not in case_names:
                continue
            reason = case.skip_reason(shape, device)
            contenders = (
                None if reason else case.contenders(device, backends, compile_skip_reason(case))
            )
            plan.append((preset, shape, case, contenders, reason))
    return plan


def run(
    shapes,
    device,
    dtype,
    budget,
    case_names,
    compile_skip_reason=_compile_everything,
    progress_stream=sys.stderr,
):
    """Measure every planned case; returns the list of result entries."""
    plan = planned_work(shapes, device, case_names, compile_skip_reason)
    progress = Progress(sum(len(c) if c else 1 for _, _, _, c, _ in plan), progress_stream)
    previous_backend = sokd.get_backend()
    results = []
    try:
        for preset, shape, case, contenders, reason in plan:
            result = {
                "preset": preset,
                "shape": shape.as_dict(),
                "case": case.name,
                "has_backward": case.has_backward,
                "status": "skipped" if reason else "ok",
                "reason": reason,
                "bytes": None,
                "copy": None,
                "contenders": [],
            }
            results.append(result)
            if reason:
                progress.report(f"{preset} {case.name}", f"skipped ({reason})", 0.0)
                continue
            torch.manual_seed(0)
            inputs = case.make_inputs(shape, device, dtype)
            expected = None
            for contender in contenders:
                started = time.perf_counter()
                entry, outputs = run_contender(
                    contender, inputs, expected, device, dtype, budget, case.tolerance_scale
                )
                if contender.kind == "reference":
                    if outputs is None:
                        raise RuntimeError(
                            f"the eager reference failed on {case.name}: {entry['reason']}"
                        )
                    expected = outputs
                result["contenders"].append(entry)
                outcome = entry["status"]
                if entry["status"] == "ok":
                    outcome += f" {entry['median_s'] * 1e3:.3f} ms"
                else:
                    outcome += f" ({entry['reason']})"
                progress.report(
                    f"{preset} {case.name} {contender.name}", outcome, time.perf_counter() - started
                )
            result["bytes"] = case.bytes_moved(inputs)
            if result["bytes"] is not None:
                result["copy"] = _copy_roofline(result["bytes"], device, budget)
            _add_ratios(result["contenders"], result["bytes"], result["copy"])
    finally:
        sokd.set_backend(previous_backend)
    return results
