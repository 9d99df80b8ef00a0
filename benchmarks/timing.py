"""Wall-clock timing shared by the benchmarks: synchronize a CUDA device around the timed call."""

from __future__ import annotations

import time

import torch


def sync(device) -> None:
    """Wait for queued kernels on a CUDA ``device`` (no-op elsewhere)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """``(seconds, fn())``, with the device synchronized before and after the call."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out
