"""Backend registry and dispatch.

A backend is a module that provides these five functions. They receive inputs that already
passed `sokd.ops` validation:

    masked_feature_loss(student, teacher, mask, normalize) -> scalar loss
    kd_loss(student, teacher, temperature, weight) -> scalar loss
    decoupled_kd_loss(student, teacher, class_mask, alpha, beta, temperature) -> scalar loss
    interest_map(heat, wh, offset, k, kernel) -> (count_map, boxes, scores)
    feature_augment(x, op_ids, values, draws) -> augmented map (no autograd needed)

Losses are differentiable with respect to the student (and, for masked_feature_loss, the
teacher). The loss is float32 for half and float32 inputs and float64 for float64 inputs.
"""

import importlib
import os
import warnings

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda", "triton")
OPS = ("masked_feature_loss", "kd_loss", "decoupled_kd_loss", "interest_map", "feature_augment")

# For CUDA tensors under "auto": the first available backend in each op's list wins. The order
# is unmeasured: no GPU has yet timed the CUDA kernels against the Triton ones (the benchmark
# stage of benchmarks/validate_gpu.py does), so it is a default, not a finding.
AUTO_CUDA_PREFERENCE = {op: ("triton", "cuda") for op in OPS}

_MODULES = {
    "reference": "sokd.reference",
    "cpu": "sokd.native",
    "cuda": "sokd.native",
    "triton": "sokd.kernels",
}

_selected = None
_load_errors = {}
# Imported backend modules by module path (None when unusable), and why they are unusable.
_imported = {}
_import_errors = {}
_warned_fallback = False


def _validate_name(name):
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")
    return name


def set_backend(name):
    """Choose the implementation behind `sokd.ops`: auto, reference, cpu, cuda or triton.

    `auto` picks the fastest native kernel for each tensor's device and falls back to the
    reference (with one warning) when no native backend was built. A named backend that
    cannot run raises an error when an op is called; it never falls back silently.
    """
    global _selected
    _selected = _validate_name(name)


def get_backend():
    if _selected is not None:
        return _selected
    return _validate_name(os.environ.get("SOKD_BACKEND", "auto"))


def _import(name):
    """The module behind backend `name`, imported once per module path (None if unusable).

    No lock: the import system serialises imports itself, and two threads racing here store
    the same result."""
    path = _MODULES[name]
    if path in _imported:
        return _imported[path]
    try:
        module = importlib.import_module(path)
    except ImportError as error:
        _import_errors[path] = f"{path} could not be imported ({error})"
        module = None
    if module is not None:
        missing = [op for op in OPS if not hasattr(module, op)]
        if missing:
            _import_errors[path] = f"{path} does not provide {', '.join(missing)}"
            module = None
    _imported[path] = module
    return module


def preload():
    """Import the backends this machine can run, so that the first op call inside
    torch.compile finds them cached (the tracer cannot follow an import)."""
    import torch

    triton_runs = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    for name in ("reference", "cpu") + (("triton",) if triton_runs else ()):
        _import(name)


def _load(name):
    """The backend's module, or None with the reason kept in _load_errors."""
    module = _import(name)
    if module is None:
        _load_errors[name] = _import_errors[_MODULES[name]]
        return None
    if name in ("cpu", "cuda") and name not in module.supported_devices():
        _load_errors[name] = f"sokd was built without {name} kernels"
        return None
    return module


def built_backends():
    """Names of the backends this installation has (auto not included), whether or not this
    machine can run them: reference always, cpu and cuda when sokd._C was built with their
    kernels, triton when sokd.kernels imports."""
    return [name for name in BACKEND_NAMES[1:] if _load(name) is not None]


def available_backends():
    """Names of the built backends that can run on this machine (auto not included): cuda
    and triton only when torch sees a GPU, except that triton is listed on a CPU-only machine
    under TRITON_INTERPRET=1, since its interpreter then runs it on CPU tensors."""
    import torch

    gpu = torch.cuda.is_available()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    runnable = {"reference": True, "cpu": True, "cuda": gpu, "triton": gpu or interpreted}
    return [name for name in built_backends() if runnable[name]]


def empty_cache():
    """Free the CPU buffers that the native kernels keep for reuse; returns the bytes freed.

    Large CPU outputs (a loss gradient, an augmented map of 16 MiB or more) return to a small
    cache when freed, so the next step's output of the same size skips the operating system's
    page zeroing. Like torch.cuda.empty_cache, this hands the cache back to the system.
    """
    module = _import("cpu")
    return 0 if module is None else module.release_cached_outputs()


def _runs_on(name, device):
    if name == "reference":
        return True
    if name == "triton":
        return device.type == "cuda" or (
            device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        )
    return device.type == name


def _fallback_to_reference(device, reason):
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"sokd: no native kernels for {device.type} tensors ({reason}); "
            "using the slower pure-PyTorch reference",
            RuntimeWarning,
            stacklevel=4,
        )
    return _load("reference")


def resolve(op, device):
    """The backend module that runs `op` for tensors on `device`."""
    name = get_backend()
    if name == "auto":
        candidates = AUTO_CUDA_PREFERENCE[op] if device.type == "cuda" else ("cpu",)
        for candidate in candidates:
            if _runs_on(candidate, device):
                module = _load(candidate)
                if module is not None:
                    return module
        reasons = "; ".join(_load_errors.get(c, f"{c} does not run here") for c in candidates)
        return _fallback_to_reference(device, reasons)
    if not _runs_on(name, device):
        hint = " (set TRITON_INTERPRET=1 to run it on CPU tensors)" if name == "triton" else ""
        raise ValueError(
            f"backend {name!r} cannot run {op} on {device.type} tensors{hint}; "
            "move the tensors or choose another backend with sokd.set_backend"
        )
    module = _load(name)
    if module is None:
        raise RuntimeError(f"backend {name!r} is not available: {_load_errors[name]}")
    return module
