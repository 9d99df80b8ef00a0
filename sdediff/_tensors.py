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
