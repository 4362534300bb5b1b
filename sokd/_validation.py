"""Argument checks shared by every public op.

Every backend receives inputs that passed these checks, so kernels never see a shape, dtype
or device they were not written for.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def is_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def tensor(
    value: object,
    name: str,
    ndim: int | Sequence[int] | None = None,
    shape_hint: str = "",
    floating: bool = True,
) -> torch.Tensor:
    is_tensor(value, name)
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got {value.dtype}"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            wanted = " or ".join(f"{d}-D" for d in allowed)
            hint = f" ({shape_hint})" if shape_hint else ""
            raise ValueError(f"{name} must be {wanted}{hint}, got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    return value


def tensor_of(
    value: object, name: str, dtypes: Collection[torch.dtype], kind: str
) -> torch.Tensor:
    """A tensor of any shape whose dtype is one of `dtypes`; `kind` names them for the error."""
    is_tensor(value, name)
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must be {kind}, got {value.dtype}")
    return value


def same_device(
    value: torch.Tensor, name: str, reference: torch.Tensor, reference_name: str
) -> None:
    _same(value.device, name, reference.device, reference_name, ValueError,
          "{name} is on {value} but {reference_name} is on {reference}; move them to one device")


def same_dtype(
    value: torch.Tensor, name: str, reference: torch.Tensor, reference_name: str
) -> None:
    _same(value.dtype, name, reference.dtype, reference_name, TypeError,
          "{name} has dtype {value} but {reference_name} has {reference}; cast them to one dtype")


def _same(
    value: object, name: str, reference: object, reference_name: str, error: type[Exception],
    message: str,
) -> None:
    if value != reference:
        raise error(message.format(
            name=name, value=value, reference_name=reference_name, reference=reference
        ))


def shape(value: torch.Tensor, name: str, expected: Sequence[int], what: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {tuple(expected)} ({what}), got {tuple(value.shape)}"
        )


# The range checks compare only (NaN fails every comparison): torch.compile with
# dynamic=True may hand them symbolic floats, which math.isfinite cannot take.


def real(value: object, name: str) -> numbers.Real:
    """value itself when it is a real number (a bool is not one), else TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return value


def positive_number(value: object, name: str) -> float:
    value = real(value, name)
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def non_negative_number(value: object, name: str) -> float:
    value = real(value, name)
    if not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return int(value)


def choice(value: T, name: str, options: Collection[Any]) -> T:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def holds(condition: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless every entry of the bool tensor `condition` is True.

    Such a check reads tensor values, so in eager mode it waits for them (a device sync on a
    GPU); under torch.jit.trace it runs on the example inputs only. Under torch.compile it
    becomes an assert inside the graph instead of a Python branch on data, which would break
    fullgraph=True; a failure there raises RuntimeError with the same message."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition.all(), message)
        return
    # Under torch.func transforms (vmap has no branch on data) the check reads the plain
    # values beneath the wrappers: every sample of a vmapped batch at once.
    while torch._C._functorch.is_functorch_wrapped_tensor(condition):
        condition = torch._C._functorch.get_unwrapped(condition)
    if not bool(condition.all()):
        raise ValueError(message)


def finite(value: torch.Tensor, name: str) -> None:
    holds(torch.isfinite(value), f"{name} contains NaN or Inf (raised because check_finite=True)")


def temperature(value: object, name: str, low: float, high: float) -> float:
    """A real number in [low, high]: the documented range of the distillation temperature."""
    value = real(value, name)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}")
    return float(value)


def fraction(value: object, name: str) -> float:
    """A real number in (0, 1]."""
    value = real(value, name)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def boolean(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value
