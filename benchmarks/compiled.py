"""Compiled fixed-step sampling: speed-up of ``CompiledODESampler`` over eager ``sample_ode``.

For each network size (``--sizes``, ``batch x hidden``; default a small MLP at 512 x 256, as in
``overhead.py``, and a tiny one at 64 x 64, where per-operation costs dominate) and each step count
(``--steps``, default 10, 25 and 50, the last as in ``overhead.py``), the same solver (``--solver``, default ``sample_ode``'s default)
runs eagerly (``sample_ode``) and compiled (``CompiledODESampler``; on CUDA ``mode="auto"`` captures
the loop as a CUDA graph with ``mode="reduce-overhead"``, on the CPU Inductor fuses it). The first
compiled call's wall time (tracing and compiling) is reported apart. Then ``--repeats`` rounds time
both right next to each other (which goes first alternates), under ``torch.no_grad()``; the
speed-up is the median over rounds of eager time / compiled time. The solver's overhead once
compiled is the compiled sampler's time over a compiled bare loop of the same model calls (each
with an Euler update, which keeps the calls from being removed as dead code), timed in the same
rounds. Compile times come from a fresh Inductor cache folder (``--keep-cache`` keeps the usual
one), after one untimed compile that pays the toolchain's start-up. The largest difference between
the two results, relative to the largest entry, checks that they computed the same thing (float32,
so about 1e-6 from reassociated sums is expected). Subnormal floats are flushed to zero
(``--denormals keep`` keeps them): the sampler's states grow to |x| ~ 800 with this untrained MLP,
the bare loop's do not, and SiLU underflowing through subnormals there would be charged to the
solver (1.07-1.08 instead of 1.02-1.04 for the 512 x 256 MLP). glibc is asked to keep freed heap
memory (``--allocator default`` leaves its trimming on), as in ``overhead.py``: with trimming,
the compiled sampler took twice the bare loop's page faults in one run (1.06 instead of 1.03);
the minor page faults per run are recorded.

Results: ``benchmarks/results/compiled.json`` (``--out``). ``--device cuda`` synchronizes after
each timed call.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import sdediff

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402
from overhead import DIM, MLP  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--sizes", default="512x256,64x64", help="comma-separated batch x hidden width")
    p.add_argument("--steps", default="10,25,50", help="comma-separated step counts")
    p.add_argument("--solver", default=inspect.signature(sdediff.sample_ode).parameters["solver"].default)
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--denormals", choices=timing.DENORMALS, default="flush",
                   help="'flush' (default): subnormal floats flushed to zero (see overhead.py); 'keep': IEEE")
    p.add_argument("--allocator", choices=("default", "keep"), default="keep",
                   help="'keep' (default): glibc keeps freed heap memory, as in overhead.py; 'default': glibc's trimming")
    p.add_argument("--keep-cache", action="store_true",
                   help="use Inductor's usual cache folder (default: a fresh one, so compile times are from scratch)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "compiled.json"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.keep_cache:  # compile times from scratch: Inductor's on-disk caches in a fresh folder
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdediff-inductor-")
    flushed = timing.set_denormals(args.denormals)
    heap_kept = timing.keep_heap() if args.allocator == "keep" else False
    torch.set_num_threads(args.threads)
    # One-time toolchain start-up (Inductor's imports, the C++ compiler's first run) is paid here,
    # untimed, so that the first configuration's compile time is comparable with the others'.
    torch.compile(lambda v: v.sin() + 1.0, dynamic=False)(torch.ones(4, device=args.device))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sde = sdediff.VPSDE()

    def timed(fn):
        return timing.timed(fn, device)

    rows = []
    for size in args.sizes.split(","):
        batch, hidden = (int(v) for v in size.lower().split("x"))
        torch.manual_seed(0)
        model = MLP(hidden=hidden).to(device).eval()
        x = torch.randn(batch, DIM, device=device)
        for steps in (int(s) for s in args.steps.split(",")):
            with torch.no_grad():
                sampler = sdediff.CompiledODESampler(model, sde, steps=steps, solver=args.solver)
                compile_s, compiled_out = timed(lambda: sampler(x).x)

                def eager():
                    return sdediff.sample_ode(model, sde, x, steps=steps, solver=args.solver).x

                def compiled():
                    return sampler(x).x

                # The compiled baseline: the same model calls with an Euler update, compiled the same
                # way (without the update, the unused calls would be removed as dead code).
                cs = [t.expand(batch) for t in sampler.ts.to(device=device, dtype=x.dtype).unbind()[:-1]]

                def bare_euler(y):
                    for c in cs:
                        y = y - 0.01 * model(y, c)
                    return y

                bare = torch.compile(bare_euler, mode=None if not cuda else "reduce-overhead", dynamic=False)
                bare_compile_s, _ = timed(lambda: bare(x).clone())

                def compiled_bare():
                    return bare(x).clone()

                _, eager_out = timed(eager)
                diff = ((compiled_out - eager_out).abs().max() / eager_out.abs().max()).item()
                for _ in range(2):
                    timed(eager), timed(compiled), timed(compiled_bare)
                runs, faults = [], {"eager": [], "compiled": [], "compiled_bare": []}
                for r in range(args.repeats):
                    order = [eager, compiled, compiled_bare]
                    order = order[r % 3:] + order[:r % 3]
                    got = {}
                    for fn in order:
                        before = timing.minor_faults()
                        got[fn.__name__] = timed(fn)[0]
                        faults[fn.__name__].append(timing.minor_faults() - before)
                    runs.append((got["eager"], got["compiled"], got["compiled_bare"]))
            row = {"batch": batch, "hidden": hidden, "steps": steps, "solver": args.solver,
                   "compile_s": compile_s, "eager_ms": 1e3 * statistics.median(r[0] for r in runs),
                   "compiled_ms": 1e3 * statistics.median(r[1] for r in runs),
                   "compiled_bare_euler_ms": 1e3 * statistics.median(r[2] for r in runs),
                   "speedup": statistics.median(r[0] / r[1] for r in runs),
                   "overhead_vs_compiled_bare": statistics.median(r[1] / r[2] for r in runs),
                   "bare_compile_s": bare_compile_s, "max_rel_diff": diff,
                   "page_faults_per_run": {k: statistics.median(v) for k, v in faults.items()}}
            rows.append(row)
            print(f"batch {batch:4d} hidden {hidden:4d} steps {steps:3d}: compile {compile_s:6.1f} s, "
                  f"eager {row['eager_ms']:8.2f} ms, compiled {row['compiled_ms']:8.2f} ms, "
                  f"speed-up {row['speedup']:.2f}x, compiled / compiled bare Euler loop "
                  f"{row['overhead_vs_compiled_bare']:.3f}, max rel diff {diff:.1e}, page faults per run "
                  f"{row['page_faults_per_run']}", flush=True)

    mode = "reduce-overhead (CUDA graphs)" if cuda else "Inductor default"
    meta = {"date": time.strftime("%Y-%m-%d"), "device": str(device), "threads": torch.get_num_threads(),
            "mode": mode, "repeats": args.repeats,
            "subnormals": "flushed to zero (torch.set_flush_denormal)" if flushed else "kept (IEEE)",
            "allocator": "heap kept (glibc mallopt: no trimming)" if heap_kept else "default",
            "inductor_cache": "usual folder" if args.keep_cache else "fresh temporary folder, after an untimed warm-up",
            "model": f"MLP {DIM}+16 time features -> hidden -> hidden -> {DIM}, SiLU, float32",
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if cuda else None, "torch": torch.__version__}
    timing.write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
