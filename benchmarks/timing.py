"""Wall-clock timing shared by the benchmarks: synchronize a CUDA device around the timed call."""

from __future__ import annotations

import ctypes
import json
import time
from pathlib import Path

try:
    import resource
except ImportError:  # not on Windows
    resource = None

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


DENORMALS = ("flush", "keep")


def set_denormals(mode: str) -> bool:
    """``"flush"``: treat subnormal floats as zero on this thread (x86 FTZ/DAZ); ``"keep"``: IEEE subnormals.

    Returns whether they are flushed. The benchmarks' untrained MLP drives the probability-flow
    states to |x| ~ 800, where SiLU's ``exp(-z)`` underflows through subnormals, which x86 CPUs
    handle in slow microcode: SiLU takes twice as long and the model 10-14% longer there than on
    the fixed bare-loop input. A trained model's states stay in the data's range, so flushing
    keeps that cost of the test model out of the ratios (``keep`` shows it).
    """
    if mode not in DENORMALS:
        raise ValueError(f"denormals must be one of {DENORMALS}, got {mode!r}")
    return bool(torch.set_flush_denormal(mode == "flush")) and mode == "flush"


def write_results(path, meta: dict, results: list) -> None:
    """Write ``{"meta": meta, "results": results}`` as JSON to ``path`` (folders made as needed) and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {path}")


def keep_heap() -> bool:
    """Ask glibc's malloc to keep freed memory (no heap trimming, tensors up to 32 MiB on the heap).

    By default glibc returns the top of the heap to the system once more than about twice the
    largest recently freed block is free, and every later allocation that regrows it touches fresh
    pages. Whether a loop's allocations trigger that varies from process to process (the heap's
    layout), and the page faults cost several percent here. False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD; each is tried, whatever the others return
        return all([libc.mallopt(opt, value) == 1 for opt, value in ((-1, 1 << 30), (-2, 64 << 20), (-3, 32 << 20))])
    except (OSError, AttributeError):
        return False


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0
