"""Backend registry and dispatch.

A backend is a module that provides the functions named in OPS, each with the signature of
the reference's (sokd/reference/<op>.py). They receive inputs that already passed the
validation of the public functions:

    masked_feature_loss(student, teacher, mask, normalize) -> scalar loss
    kd_loss(student, teacher, temperature, weight) -> scalar loss
    decoupled_kd_loss(student, teacher, class_mask, alpha, beta, temperature) -> scalar loss
    interest_map(heat, wh, offset, k, kernel) -> (count_map, boxes, scores)
    feature_augment(x, op_ids, values, draws) -> augmented map (no autograd needed)
    logit_distill_loss(student_logits, teacher_logits, *, options) -> loss (rows for "none")
    fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                              student_bias, teacher_bias, *, options) -> loss

The logit losses take 2-D rows. Losses are differentiable with respect to the student (and,
for masked_feature_loss, the teacher). The loss is float32 for half and float32 inputs and
float64 for float64 inputs.

The backends are data: BACKENDS holds one record per backend (the devices it serves, the ops
it implements, why this machine cannot run it, how its module is loaded, where its ops live),
and selection reads only that table. The cpu, cuda and triton backends share one module,
sokd.native, which calls the sokd:: ops; they differ in the kernel that runs below the op's
autograd, which the op's router asks of runs_triton.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda", "triton")
# The ops of SoKD, and those of language-model distillation (docs/algorithm.md §7).
SOKD_OPS = ("masked_feature_loss", "kd_loss", "decoupled_kd_loss", "interest_map",
            "feature_augment")
LOGIT_OPS = ("logit_distill_loss", "fused_linear_distill_loss")
OPS = SOKD_OPS + LOGIT_OPS
# Ops built from other ops: one kernel for every device (csrc/composite/<op>_kernel.cpp).
COMPOSITE_OPS = ("fused_linear_distill_loss",)


def _load_reference() -> ModuleType:
    from . import reference

    return reference


def _load_native(device_type: str) -> ModuleType:
    from . import native  # raises ImportError when sokd._C was not built

    if device_type not in native.supported_devices():
        raise ImportError(f"sokd was built without {device_type} kernels")
    return native


def _load_triton() -> ModuleType:
    from . import kernels  # noqa: F401 (raises ImportError without triton)
    from . import native  # the sokd:: ops, whose routers run the launchers of kernels/

    return native


def _gpu_missing() -> str | None:
    return None if torch.cuda.is_available() else "torch sees no GPU"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_cannot_run() -> str | None:
    if _interpreted():
        return None
    reason = _gpu_missing()
    return None if reason is None else f"{reason} and TRITON_INTERPRET is not 1"


def _native_sources(kernel_file: str, ops: tuple[str, ...]) -> tuple[str, ...]:
    """The sokd._C files behind the native ops: each op's schema in csrc/<op>.cpp and its
    kernel in csrc/<kernel_file> (with {op} for the op's name) or csrc/composite/, the losses'
    autograd, and the Python side (fakes and the calls into the ops)."""
    def kernel(op: str) -> str:
        return f"composite/{op}_kernel.cpp" if op in COMPOSITE_OPS else kernel_file.format(op=op)

    per_op = [(f"csrc/{op}.cpp", "csrc/" + kernel(op)) for op in ops]
    return ("sokd/native.py", "csrc/autograd.cpp") + tuple(p for pair in per_op for p in pair)


@dataclass(frozen=True)
class Backend:
    """One implementation of the ops in OPS.

    devices: the tensor device types it serves. interpreted_devices: those it serves only
    under TRITON_INTERPRET=1 (the Triton interpreter runs kernels on CPU tensors).
    ops: the ops it has a kernel for (the CUDA C++ kernels lack the logit losses, which run on
    GPUs through Triton).
    available(): None when this machine can run it, else the reason (built or not).
    load: imports its module (ImportError when it was not built or installed).
    registered_in: the source files that implement or register its ops.
    """

    name: str
    devices: tuple[str, ...] | None  # None: every device type
    available: Callable[[], str | None]
    load: Callable[[], ModuleType]
    registered_in: tuple[str, ...]
    interpreted_devices: tuple[str, ...] = ()
    ops: tuple[str, ...] = OPS

    def runs_on(self, device_type: str) -> bool:
        if self.devices is None or device_type in self.devices:
            return True
        return device_type in self.interpreted_devices and _interpreted()


BACKENDS: dict[str, Backend] = {
    "reference": Backend(
        name="reference",
        devices=None,
        available=lambda: None,
        load=_load_reference,
        registered_in=("sokd/reference/",),
    ),
    "cpu": Backend(
        name="cpu",
        devices=("cpu",),
        available=lambda: None,
        load=lambda: _load_native("cpu"),
        registered_in=_native_sources("cpu/{op}_kernel.cpp", OPS),
    ),
    "cuda": Backend(
        name="cuda",
        devices=("cuda",),
        available=_gpu_missing,
        load=lambda: _load_native("cuda"),
        registered_in=_native_sources("cuda/{op}_kernel.cu", SOKD_OPS),
        ops=SOKD_OPS,
    ),
    "triton": Backend(
        name="triton",
        devices=("cuda",),
        interpreted_devices=("cpu",),
        available=_triton_cannot_run,
        load=_load_triton,
        registered_in=("kernels/", "sokd/native.py"),
    ),
}

# For CUDA tensors under "auto": the first available backend in each op's list wins. The order
# is not measured: no GPU has yet timed the CUDA kernels against the Triton ones, so it is a
# default, not a finding. The logit losses have only the Triton kernel on a GPU.
AUTO_ORDER = {
    "cpu": ("cpu",),
    "cuda": {op: ("triton", "cuda") for op in SOKD_OPS} | {op: ("triton",) for op in LOGIT_OPS},
}

_selected: str | None = None
# Loaded backend modules by name (None when unusable), and why they are unusable. No lock: the
# import system serialises imports itself, and two threads racing here store the same result.
_loaded: dict[str, ModuleType | None] = {}
_load_errors: dict[str, str] = {}
_warned_fallback = False


def _validate_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Choose the implementation behind `sokd.ops`: auto, reference, cpu, cuda or triton.

    `auto` picks the fastest native kernel for each tensor's device and falls back to the
    reference (with one warning) when no native backend was built. A named backend that
    cannot run raises an error when an op is called; it never falls back silently.
    """
    global _selected
    _selected = _validate_name(name)


def get_backend() -> str:
    if _selected is not None:
        return _selected
    return _validate_name(os.environ.get("SOKD_BACKEND", "auto"))


def _load(name: str) -> ModuleType | None:
    """The module of backend `name`, loaded once (None with the reason in _load_errors)."""
    if name in _loaded:
        return _loaded[name]
    try:
        module = BACKENDS[name].load()
    except ImportError as error:
        _load_errors[name] = f"{name} could not be loaded ({error})"
        module = None
    if module is not None:
        missing = [op for op in BACKENDS[name].ops if not hasattr(module, op)]
        if missing:
            _load_errors[name] = f"{module.__name__} does not provide {', '.join(missing)}"
            module = None
    _loaded[name] = module
    return module


def preload() -> None:
    """Load the backends this machine can run, so that the first op call inside
    torch.compile finds them cached (the tracer cannot follow an import)."""
    for name, backend in BACKENDS.items():
        if name != "cuda" and backend.available() is None:
            _load(name)


def built_backends() -> list[str]:
    """Names of the backends this installation has (auto not included), whether or not this
    machine can run them: reference always, cpu and cuda when sokd._C was built with their
    kernels, triton when sokd.kernels imports."""
    return [name for name in BACKEND_NAMES[1:] if _load(name) is not None]


def available_backends() -> list[str]:
    """Names of the built backends that can run on this machine (auto not included): cuda
    and triton only when torch sees a GPU, except that triton is listed on a CPU-only machine
    under TRITON_INTERPRET=1, since its interpreter then runs it on CPU tensors."""
    return [name for name in built_backends() if BACKENDS[name].available() is None]


def empty_cache() -> int:
    """Free the CPU buffers that the native kernels keep for reuse; returns the bytes freed.

    Large CPU outputs (a loss gradient, an augmented map of 16 MiB or more) return to a small
    cache when freed, so the next step's output of the same size skips the operating system's
    page zeroing. Like torch.cuda.empty_cache, this hands the cache back to the system.
    """
    module = _load("cpu")
    return 0 if module is None else module.release_cached_outputs()


def _runs_on(name: str, device) -> bool:
    return BACKENDS[name].runs_on(device.type)


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


def _auto_candidates(op, device) -> tuple[str, ...]:
    return AUTO_ORDER["cuda"][op] if device.type == "cuda" else AUTO_ORDER["cpu"]


def _auto_choice(op, device) -> str | None:
    """The backend that "auto" runs `op` with on `device`, or None when none of its
    candidates is usable."""
    for candidate in _auto_candidates(op, device):
        if _runs_on(candidate, device) and _load(candidate) is not None:
            return candidate
    return None


def runs_triton(op, device) -> bool:
    """Whether the kernel below the sokd:: op `op` for tensors on `device` is the Triton
    launcher: the triton backend is selected, or "auto" chooses it for that op."""
    name = get_backend()
    if name == "auto":
        name = _auto_choice(op, device)
    return name == "triton"


def resolve(op, device):
    """The backend module that runs `op` for tensors on `device`."""
    name = get_backend()
    if name != "auto" and op not in BACKENDS[name].ops:
        having = ", ".join(n for n, b in BACKENDS.items() if op in b.ops)
        raise ValueError(
            f"backend {name!r} has no {op} kernel (backends with one: {having}); choose "
            "another backend with sokd.set_backend"
        )
    if name == "auto":
        choice = _auto_choice(op, device)
        if choice is not None:
            return _load(choice)
        candidates = _auto_candidates(op, device)
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


def backend_for(op, device):
    """The backend module that runs `op`. Under torch.func transforms (grad, vmap, jacrev,
    ...) that is always the reference: the kernel backends run as fused autograd functions,
    which functorch cannot transform, and the reference computes the same values in plain
    PyTorch ops, which it can (to any order)."""
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return _load("reference")
    return resolve(op, device)
