"""Small tensor helpers shared across modules."""

from __future__ import annotations

import torch


def moved(cache: dict, like: torch.Tensor, tensors) -> tuple:
    """``tensors`` in ``like``'s device and dtype, converted once per (device, dtype) and kept in ``cache``.

    Keeps host-to-device copies out of loops that evaluate a schedule or a score many times.
    """
    key = (like.device, like.dtype)
    if key not in cache:
        cache[key] = tuple(t.to(device=like.device, dtype=like.dtype) for t in tensors)
    return cache[key]


HALF = (torch.float16, torch.bfloat16)


def time_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loop carries its times in for states of ``dtype``: at least float32.

    bfloat16 resolves 2^-8 near t = 1, so a 1000-step grid in it would repeat times and the grid
    of any step count would be rounded; the solvers' coefficients come from these times, and a
    0-d coefficient does not change the state's dtype.
    """
    return torch.float32 if dtype in HALF else dtype


def in_state_dtype(score, x: torch.Tensor):
    """``score`` cast to a half-precision state's dtype (other states keep the score's own dtype).

    Adapters compute with float32 times, and their ``alpha``, ``sigma`` would promote the state.
    """
    return score.to(x.dtype) if x.dtype in HALF and isinstance(score, torch.Tensor) else score


def checksum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`checksum` sums ``dtype`` in: half precision accumulates in float32."""
    return torch.float32 if dtype in HALF else dtype


def checksum(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The sum of ``x``, 0-d: finite iff every entry of ``x`` is. No host sync.

    One reduction instead of an elementwise ``isfinite``: a NaN or infinity makes the sum
    non-finite. Half-precision sums accumulate in float32, so only a state beyond float32's
    range (itself a blow-up) could be flagged without a non-finite entry. ``out``: a 0-d tensor
    of dtype :func:`checksum_dtype` to write into (a loop then allocates nothing per step). The
    sum is taken of ``x.detach()``: it is never differentiated, and ``out=`` would refuse a
    tensor that requires grad.
    """
    dtype = checksum_dtype(x.dtype)
    x = x.detach()
    if out is None:
        return x.sum(dtype=dtype)
    return torch.sum(x, dim=tuple(range(x.dim())), dtype=dtype, out=out)


def finiteness(total: torch.Tensor) -> torch.Tensor:
    """0 where ``total`` is finite, infinity where it is not: a checksum's verdict in any float dtype."""
    return torch.where(torch.isfinite(total), 0.0, float("inf"))
