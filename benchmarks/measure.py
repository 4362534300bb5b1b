"""Timing, peak memory and the output check.

Peak extra memory is what one step allocates above what was live before it:
- CUDA: torch.cuda.max_memory_allocated after resetting the peak, minus the memory allocated
  before the step.
- CPU: torch has no peak counter for CPU memory, so the step runs once under the profiler
  with memory accounting. Every allocation and free by torch's CPU allocator is an event with
  a signed size; the running sum over time, in order, peaks at the step's peak extra memory.
  This counts exactly torch's tensor memory (not the Python heap or the allocator's caching).
"""

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

# Relative tolerance of the output check, against the largest magnitude of each reference
# tensor: fp32 differs from the reference only by summation order.
CHECK_TOLERANCE = {
    torch.float32: 2e-4,
    torch.float64: 1e-9,
    torch.bfloat16: 3e-2,
    torch.float16: 1e-2,
}


# A timing is unstable when its interquartile range exceeds this fraction of its median, or
# when the machine's load average exceeds its core count (other work then takes time slices
# from the measured one). An unstable timing is measured again, up to ATTEMPTS times in all;
# if it stays unstable it keeps the reason, which the tables print as a warning.
SPREAD_LIMIT = 0.25
ATTEMPTS = 3


@dataclass
class Timing:
    median_s: float
    iqr_s: float
    reps: int
    unstable: str = None  # why the timing cannot be trusted, or None

    @property
    def spread(self):
        """The interquartile range relative to the median."""
        return self.iqr_s / self.median_s if self.median_s > 0 else 0.0


@dataclass
class Budget:
    """How long to time one contender: at least min_reps runs, then until budget_s is spent
    or max_reps is reached. Steps slower than slow_s get slow_reps runs instead of min_reps."""

    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float
    slow_s: float = 1.0
    slow_reps: int = 3


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_problem():
    """Why the machine is too busy for trustworthy timings (load average above the number of
    cores), or None."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        return f"load average {load:.1f} above {cores} cores"
    return None


def instability(timing):
    """Why `timing` is unstable, or None."""
    if timing.spread > SPREAD_LIMIT:
        return f"spread (IQR) {100 * timing.spread:.0f}% of the median"
    return load_problem()


def time_step(step, device, budget, attempts=ATTEMPTS):
    """Median and interquartile range of `step`'s wall time over repeated runs.

    An unstable measurement (see `instability`) is repeated, up to `attempts` in all; the
    steadiest one is kept, and if every attempt was unstable it carries the reason."""
    best = None
    for _ in range(attempts):
        timing = _time_once(step, device, budget)
        reason = instability(timing)
        if reason is None:
            return timing
        if best is None or timing.spread < best.spread:
            best, best_reason = timing, reason
    best.unstable = f"{best_reason} (measured {attempts} times)"
    return best


def _time_once(step, device, budget):
    """Median and interquartile range of `step`'s wall time, after budget.warmup runs."""
    for _ in range(budget.warmup):
        begin = time.perf_counter()
        step()
        synchronize(device)
        if time.perf_counter() - begin > budget.slow_s:
            break  # a slow step is warm after one run; more would only cost time
    times = []
    start = time.perf_counter()
    while True:
        begin = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - begin)
        needed = budget.slow_reps if times[0] > budget.slow_s else budget.min_reps
        spent = time.perf_counter() - start
        if len(times) >= needed and (spent >= budget.budget_s or len(times) >= budget.max_reps):
            break
    if len(times) >= 2:
        quartiles = statistics.quantiles(times, n=4, method="inclusive")
        iqr = quartiles[2] - quartiles[0]
    else:
        iqr = 0.0
    return Timing(statistics.median(times), iqr, len(times))


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's native tracer writes status lines straight to file descriptor 2; keep
    them out of the progress display."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(step, device):
    """Peak memory one run of `step` allocates above what was live before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        outputs = step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del outputs
        return max(peak, 0)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with (
        _quiet_stderr(),
        torch.profiler.profile(activities=activities, profile_memory=True) as profile,
    ):
        step()
    events = [e for e in profile.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def compare(outputs, expected, dtype, tolerance_scale=1.0):
    """None when `outputs` matches the reference `expected` for inputs of `dtype`, else what
    differs."""
    if len(outputs) != len(expected):
        return f"returned {len(outputs)} tensors, the reference {len(expected)}"
    for index, (got, want) in enumerate(zip(outputs, expected)):
        if got.shape != want.shape:
            return f"output {index} has shape {tuple(got.shape)}, the reference {tuple(want.shape)}"
        if not want.is_floating_point():
            if not torch.equal(got.to(want.dtype), want):
                mismatches = int((got.to(want.dtype) != want).sum())
                return f"output {index}: {mismatches} of {want.numel()} integers differ"
            continue
        got, want = got.detach().double(), want.detach().double()
        if not bool(torch.isfinite(got).all()):
            return f"output {index} holds NaN or Inf"
        scale = max(float(want.abs().max()), 1e-12)
        error = float((got - want).abs().max()) / scale
        if error > CHECK_TOLERANCE[dtype] * tolerance_scale:
            return f"output {index} differs by {error:.2e} relative to its largest value"
    return None
