"""Input validation shared by the public entry points.

Every check raises a ``TypeError`` or ``ValueError`` whose message names the argument and the
accepted range. Checks run once, at the boundary; inner loops trust their inputs.
"""

from __future__ import annotations

import math
import numbers

import torch


def real(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """Return ``value`` as a finite float inside the given bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    accepted = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite and in {accepted}, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be in {accepted}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be in {accepted}, got {value}")
    return value


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return int(value)


def float_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def batched(name: str, x) -> torch.Tensor:
    """A state tensor ``(batch, *dims)``."""
    x = float_tensor(name, x)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (batch, *dims) with batch >= 1, got {tuple(x.shape)}")
    return x


def callable_(name: str, value):
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def within(name: str, t: torch.Tensor, low: float, high: float) -> None:
    """Raise if any entry of ``t`` lies outside ``[low, high]`` or is not finite."""
    if t.numel() == 0:
        return
    outside = ~torch.isfinite(t) | (t < low) | (t > high)
    if bool(outside.any()):
        bad = t[outside].flatten()[0].item()
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}], got {bad:g}")
