"""Where ``sample_ode``'s overhead goes: the same DPM-Solver++(2M) sampling call, stripped layer by layer.

Each variant integrates the probability-flow ODE of ``overhead.py``'s MLP score (50 steps,
``dpmpp_2m`` on its default grid, batch 512, 1 thread, float32, ``torch.no_grad()``), and each is
timed next to the bare loop of 50 model calls; the figure is the median over rounds of variant
time / bare time. Variants, from the least to the whole:

* ``floor``: the four tensor operations a two-history multistep step needs, arbitrary coefficients;
* ``plain``: the same arithmetic with sdediff's coefficients and grid, in a plain Python loop;
* ``plain + checksum``: that, plus the per-step checksum of the state into a preallocated tensor;
* ``solver layers``: a loop over ``advance -> step -> ReverseProcess.score`` (no checks, no counter);
* ``integrate, no checksum``: ``integrate`` with its per-step checksum replaced by a no-op;
* ``integrate``: ``integrate`` on a prebuilt term and grid (call counter, checksum, validation);
* ``sample_ode``: the whole public call (grid, score monitor, the rest).

The two ``integrate`` variants reach into sdediff's internals; they measure, they are not an API.
Subnormals are flushed and glibc keeps its heap (see ``overhead.py``), so neither moves the ratios.
``--processes`` runs the rounds in that many fresh processes (heap layout and code placement differ
between processes by a percent or two) and prints each process's line. Results:
``benchmarks/results/overhead_ablation.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402
import timing  # noqa: E402

import sdediff  # noqa: E402
from sdediff.sampling import _solver_grid  # noqa: E402
from sdediff.solvers.base import get_solver  # noqa: E402

integrate_module = importlib.import_module("sdediff.integrate")


def variants(model, x, steps):
    sde = sdediff.VPSDE()
    batch = x.shape[0]
    solver = get_solver("dpmpp_2m", "ode")
    ts = _solver_grid(sde, solver, steps, steps, None, 1e-3, None, x.dtype, x.device)
    term = sdediff.ReverseProcess(sde, model, 0.0).ode_term()
    coeffs = solver.init(term, x, ts)[2]
    times = ts.unbind()
    cs = [torch.full((batch,), 1.0 - i / steps) for i in range(steps)]

    def bare():
        for c in cs:
            out = model(x, c)
        return out

    def plain(check):
        def fn():
            y, history, sums = x, (), torch.empty(steps)
            for i in range(steps):
                a, b, sig2 = coeffs[i]
                history = (torch.add(y, model(y, times[i].expand(batch)), alpha=sig2),) + history[:1]
                y_next = torch.mul(y, a)
                for w, v in zip(b, history):
                    y_next.add_(v, alpha=w)
                y = y_next
                if check:
                    torch.sum(y, dim=(0, 1), out=sums[i])
            return y
        return fn

    def layers():
        y, state = x, solver.init(term, x, ts)
        for i in range(steps):
            y, state = integrate_module.advance(solver, term, y, times[i], times[i + 1], state)
        return y

    def integrate(check):
        def fn():
            if check:
                return integrate_module.integrate(term, x, ts, solver=solver).x
            real = integrate_module.checksum
            integrate_module.checksum = lambda v, out=None: out.zero_()  # a finite stand-in, no pass over v
            try:
                return integrate_module.integrate(term, x, ts, solver=solver).x
            finally:
                integrate_module.checksum = real
        return fn

    def sample_ode():
        return sdediff.sample_ode(model, sde, x, steps=steps, solver="dpmpp_2m", t_end=1e-3).x

    return {"bare": bare, "floor": overhead.multistep_floor(model, x, cs), "plain": plain(False),
            "plain + checksum": plain(True), "solver layers": layers, "integrate, no checksum": integrate(False),
            "integrate": integrate(True), "sample_ode": sample_ode}


def run(rounds, steps):
    timing.set_denormals("flush")
    timing.keep_heap()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = overhead.MLP().eval()
    x = torch.randn(512, overhead.DIM)
    loops = variants(model, x, steps)
    names = list(loops)
    times = {n: [] for n in names}
    with torch.no_grad():
        for _ in range(3):
            for fn in loops.values():
                fn()
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:  # the order rotates between rounds
                t0 = time.perf_counter()
                loops[n]()
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(a / b for a, b in zip(times[n], times["bare"])) for n in names[1:]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "overhead_ablation.json"))
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single process's share
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run(args.rounds, args.steps)))
        return
    lines = []
    for _ in range(args.processes):
        out = subprocess.run([sys.executable, __file__, "--one", "--rounds", str(args.rounds),
                              "--steps", str(args.steps)], check=True, capture_output=True, text=True).stdout
        lines.append(json.loads(out.strip().splitlines()[-1]))
    print(f"median over {args.rounds} rounds of time / bare-loop time, one process per column")
    rows = []
    for name in lines[0]:
        per_process = [line[name] for line in lines]
        rows.append({"name": name, "ratio_per_process": per_process, "mean": statistics.fmean(per_process)})
        print(f"{name:24s} " + " ".join(f"{v:.3f}" for v in per_process) + f"   mean {rows[-1]['mean']:.3f}")
    meta = {"date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "steps": args.steps,
            "processes": args.processes, "solver": "dpmpp_2m", "threads": 1, "subnormals": "flushed",
            "allocator": "heap kept (glibc mallopt)", "ratio": "median over rounds of variant time / bare-loop time",
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    timing.write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
