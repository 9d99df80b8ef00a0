"""Fit the time grid to a model at 5, 10 and 20 steps, and check it on draws it was not fitted on.

The model is the exact score of a stiff 2-D mixture (8 components of std 0.03 on a circle), so
the error against the exact probability-flow ODE solution is the solver's alone. For each step
count, ``calibrate_grid`` fits a grid for ``unipc`` (``sample_ode``'s default) on pilot draws;
the table compares it with the solver's default grid on new draws, and the figure shows where
the calibrated steps fall in log-SNR and the error against NFE.

    python examples/calibrated_grid.py            # about 30 s on 2 cores
    python examples/calibrated_grid.py --quick    # a few seconds: 5 and 10 steps, small batches
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from sdediff import VPSDE, GaussianMixture, calibrate_grid, get_solver, sample_ode, time_grid

F64 = torch.float64


def ring(k: int = 8, radius: float = 2.0, std: float = 0.03) -> GaussianMixture:
    angles = torch.arange(k, dtype=F64) * (2 * math.pi / k)
    return GaussianMixture(torch.full((k,), 1.0 / k, dtype=F64), radius * torch.stack([angles.cos(), angles.sin()], 1),
                           std)


def rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x - y) ** 2).mean().sqrt())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--solver", default="unipc")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "outputs" / "calibrated_grid.png"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    sde, t_end = VPSDE(), 1e-3
    score_fn = ring().score_fn(sde)
    steps_list, n_pilot, n_test, max_runs = ((5, 10), 256, 256, 300) if args.quick else ((5, 10, 20), 1024, 1024, 1000)
    pilot = sde.prior_sample((n_pilot, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    x = sde.prior_sample((n_test, 2), generator=torch.Generator().manual_seed(1), dtype=F64)  # held out
    exact = sample_ode(score_fn, sde, x, solver="dopri5", rtol=1e-10, atol=1e-10, t_end=t_end).x

    rows = []
    print(f"{args.solver} on a 2-D ring of 8 components (std 0.03); RMSE on {n_test} held-out draws")
    print(f"{'steps':>5s} {'default grid':>12s} {'calibrated':>10s} {'gain':>5s}   calibration ({n_pilot} pilot draws)")
    for steps in steps_list:
        t0 = time.perf_counter()
        cal = calibrate_grid(score_fn, sde, pilot, steps, solver=args.solver, t_end=t_end, max_runs=max_runs)
        seconds = time.perf_counter() - t0
        default = rmse(sample_ode(score_fn, sde, x, steps=steps, solver=args.solver, t_end=t_end).x, exact)
        tuned = rmse(sample_ode(score_fn, sde, x, grid=cal.grid, solver=args.solver).x, exact)
        rows.append(dict(steps=steps, default_rmse=default, calibrated_rmse=tuned, pilot_rmse=cal.rmse,
                         pilot_rmse_initial=cal.initial_rmse, runs=cal.runs, nfe=cal.nfe, seconds=round(seconds, 1),
                         grid=cal.grid.tolist()))
        print(f"{steps:5d} {default:12.2e} {tuned:10.2e} {default / tuned:5.1f}   {cal.runs} runs, {cal.nfe} NFE, "
              f"{seconds:.0f} s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"solver": args.solver, "rows": rows}, indent=1))
    plot(out, sde, get_solver(args.solver, "ode"), rows, t_end)
    print(f"wrote {out} and {out.with_suffix('.json')}")


def plot(out: Path, sde, solver, rows, t_end):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(rows):
        default = time_grid(sde, r["steps"], grid=solver.default_grid, t_end=t_end)
        for name, ts, marker in ((solver.default_grid, default, "|"),
                                 ("calibrated", torch.tensor(r["grid"], dtype=F64), "o")):
            lam = sde.log_snr(ts).numpy()
            left.plot(lam, [i + (0.15 if name == "calibrated" else -0.15)] * len(lam), marker, ls="-", lw=0.5,
                      color="tab:red" if name == "calibrated" else "gray", label=name if i == 0 else None)
    left.set_yticks(range(len(rows)), [f"{r['steps']} steps" for r in rows])
    left.set_xlabel("log-SNR of the grid times")
    left.legend(fontsize=8)
    nfes = [r["steps"] * solver.evals_per_step for r in rows]
    right.loglog(nfes, [r["default_rmse"] for r in rows], "s--", color="gray",
                 label=f"default ({solver.default_grid}) grid")
    right.loglog(nfes, [r["calibrated_rmse"] for r in rows], "o-", color="tab:red", label="calibrated grid")
    right.set_xlabel("NFE")
    right.set_ylabel("RMSE vs the exact ODE solution (held-out)")
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
