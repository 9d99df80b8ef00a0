"""Log-likelihood accuracy and wall time: sdediff's exact and Hutchinson divergence vs a score_sde-style loop.

Problem: ``--samples`` (default 200) exact draws of a 64-D Gaussian mixture (5 components, weights
0.35/0.25/0.20/0.12/0.08, random means of norm 2.5 to 3.5, isotropic stds 0.2 to 0.6, seed 1234),
``VPSDE()`` (linear beta 0.1 -> 20), float64, ``t_start = 1e-5``, ``rtol = atol = 1e-5``. The score
is the mixture's exact score ``gm.score_fn(sde)``, so the exact answer is known in closed form:
``gm.marginal_log_prob(sde, x, t_start)``. Errors are mean |logp - exact| over the samples, divided
by the dimension (nats/dim).

The N(0, I) prior is not exactly ``p_T``; every method carries ``log p_T(z) - log N(z; 0, I)``
(``gm.marginal_log_prob(sde, z, 1.0) - sde.prior_logp(z)``). It is reported separately (signed mean
and mean absolute value over the samples, nats/dim), and so is the "solver error" ``|logp + mismatch - exact|``, the error with
the true ``p_T`` in place of the prior, which is the part the ODE solve and the divergence own.

Methods, all in one process, on the same samples:

* ``sdediff exact``: ``log_likelihood(..., divergence="exact")`` (adaptive dopri5, the full Jacobian
  trace by ``torch.func.vmap`` over vector-Jacobian products) at each ``--chunk-sizes`` value
  (default 16, the library default and the headline, then 1 (a loop), 8 and 128). One warm-up run, then ``--repeats``
  timed runs; best and median wall time.
* ``baseline``: written here in the style of score_sde's likelihood code (not copied from it):
  ``scipy.integrate.solve_ivp(method="RK45", rtol, atol)`` on the flattened batch as a numpy state
  ``[x (n * 64), delta_logp (n)]``; every evaluation converts the numpy state to a torch tensor,
  computes the score with autograd on, and takes the exact divergence with one backward pass per
  dimension (``grad(score[:, i].sum(), x)[:, i]`` for i in 0..63), then converts back to numpy.
  ``--baseline-repeats`` timed runs (after one warm-up evaluation of the field).
* ``sdediff hutchinson``: ``divergence="hutchinson"``, Rademacher probes, K in ``--probes``
  (default 1, 4, 16, 64), seeded generator. Reported: error vs the closed form, mean reported
  ``stderr`` and ``stderr * sqrt(K)`` (constant if stderr falls as 1/sqrt(K)), z-scores
  ``(estimate - sdediff exact) / stderr`` (their std should be ~1 for K >= 4: the reported stderr
  matches the observed spread; K = 1 has no stderr; with few probes the per-sample stderr is itself
  noisy, so the z-scores are heavy-tailed), the ratio of the observed spread
  ``std(estimate - exact)`` to the root-mean-square reported stderr (~1 if calibrated), and wall
  time relative to K = 1.

Target stated in issue 7: sdediff's exact divergence in at most 0.1x the baseline's time at equal or
better accuracy. The ratio printed is best sdediff time / best baseline time (median ratio too).

Timing: ``torch.set_num_threads(--threads)`` (default 1), ``--device cuda`` synchronizes after each
run. Results: ``benchmarks/results/likelihood.json`` (``likelihood_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

import sdediff

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import timed  # noqa: E402

F64 = torch.float64


def make_problem(n: int, seed: int, device):
    g = torch.Generator().manual_seed(1234)
    k, d = 5, 64
    weights = torch.tensor([0.35, 0.25, 0.20, 0.12, 0.08], dtype=F64)
    directions = torch.randn(k, d, generator=g, dtype=F64)
    norms = 2.5 + torch.rand(k, 1, generator=g, dtype=F64)
    means = directions / directions.norm(dim=1, keepdim=True) * norms
    stds = 0.2 + 0.4 * torch.rand(k, generator=g, dtype=F64)
    gm = sdediff.GaussianMixture(weights, means, stds)
    x = gm.sample(n, generator=torch.Generator().manual_seed(seed), dtype=F64, device=device)
    return gm, x


# --------------------------------------------------------------------------- baseline (score_sde style)

def baseline_log_likelihood(score_fn, sde, x, *, t_start, rtol, atol):
    """scipy RK45 on a flat numpy state; exact divergence by one autograd pass per dimension."""
    n, d = x.shape
    device, dtype = x.device, x.dtype
    nfe = 0

    def ode_func(t, y):
        nonlocal nfe
        nfe += 1
        xt = torch.from_numpy(y[: n * d].reshape(n, d)).to(device=device, dtype=dtype)
        tt = torch.full((n,), t, device=device, dtype=dtype)
        with torch.enable_grad():
            xt.requires_grad_(True)
            score = score_fn(xt, tt)
            div_score = torch.zeros(n, device=device, dtype=dtype)
            for i in range(d):
                grad = torch.autograd.grad(score[:, i].sum(), xt, retain_graph=i < d - 1)[0]
                div_score = div_score + grad[:, i]
        # VP probability flow: dx/dt = -beta/2 x - beta/2 score; div = -beta/2 d - beta/2 div score
        beta = sde.diffusion(torch.tensor(t, dtype=F64)).item() ** 2
        drift = -0.5 * beta * xt.detach() - 0.5 * beta * score.detach()
        div = -0.5 * beta * d - 0.5 * beta * div_score
        return np.concatenate([drift.cpu().numpy().reshape(-1), div.cpu().numpy()])

    y0 = np.concatenate([x.detach().cpu().numpy().reshape(-1), np.zeros(n)])
    sol = solve_ivp(ode_func, (t_start, sde.T), y0, method="RK45", rtol=rtol, atol=atol)
    yT = sol.y[:, -1]
    z = torch.from_numpy(yT[: n * d].reshape(n, d)).to(device=device, dtype=dtype)
    delta = torch.from_numpy(yT[n * d:]).to(device=device, dtype=dtype)
    return sde.prior_logp(z) + delta, z, nfe


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20 samples, K in (1, 4), fewer repeats")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--samples", type=int, default=None, help="default 200 (20 with --quick)")
    p.add_argument("--probes", type=int, nargs="+", default=None, help="default 1 4 16 64 (1 4 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed sdediff runs (default 5; 2 with --quick)")
    p.add_argument("--baseline-repeats", type=int, default=None, help="timed baseline runs (default 2; 1 quick)")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 1, 8, 128],
                   help="chunk_size values for sdediff exact (first = headline; default 16 1 8 128; 1 is a loop)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/likelihood[_quick].json)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    q = args.quick
    n = args.samples or (20 if q else 200)
    probes = args.probes or ([1, 4] if q else [1, 4, 16, 64])
    repeats = args.repeats or (2 if q else 5)
    b_repeats = args.baseline_repeats or (1 if q else 2)
    device = args.device
    torch.set_num_threads(args.threads)
    t_start, rtol, atol = 1e-5, 1e-5, 1e-5

    sde = sdediff.VPSDE()
    gm, x = make_problem(n, args.seed, device)
    d = gm.dim
    score_fn = gm.score_fn(sde)
    exact = gm.marginal_log_prob(sde, x, t_start)

    def summarize(logp, z):
        mismatch = gm.marginal_log_prob(sde, z, 1.0) - sde.prior_logp(z)
        return {
            "mean_abs_error_nats_per_dim": ((logp - exact).abs().mean() / d).item(),
            "prior_mismatch_nats_per_dim": (mismatch.mean() / d).item(),
            "prior_mismatch_abs_nats_per_dim": (mismatch.abs().mean() / d).item(),
            "solver_error_nats_per_dim": ((logp + mismatch - exact).abs().mean() / d).item(),
        }

    def times(ts):
        return {"best_s": min(ts), "median_s": statistics.median(ts), "all_s": ts}

    results = {"config": {"samples": n, "dim": d, "sde": repr(sde), "dtype": "float64", "t_start": t_start,
                          "rtol": rtol, "atol": atol, "device": str(device), "threads": args.threads,
                          "repeats": repeats, "baseline_repeats": b_repeats, "seed": args.seed,
                          "mixture": {"weights": gm.weights.tolist(), "mean_norms": gm.means.norm(dim=1).tolist(),
                                      "stds": gm.stds[:, 0].tolist()},
                          "torch": torch.__version__, "python": platform.python_version(),
                          "machine": platform.machine(), "cuda": torch.cuda.get_device_name() if
                          torch.device(device).type == "cuda" else None}}

    # sdediff exact, at each chunk size (the first is the headline; 16 is the library default)
    exact_rows = []
    for cs in args.chunk_sizes:
        run_exact = lambda: sdediff.log_likelihood(score_fn, sde, x, divergence="exact", t_start=t_start,  # noqa: E731
                                                   rtol=rtol, atol=atol, chunk_size=cs)
        run_exact()  # warm-up
        ts, res = [], None
        for _ in range(repeats):
            t, res = timed(run_exact, device)
            ts.append(t)
        exact_rows.append({"chunk_size": cs, "nfe": res.nfe, **times(ts), **summarize(res.logp, res.z)})
        if len(exact_rows) == 1:
            exact_ode = res.logp
        print(f"sdediff exact chunk_size={cs}: {exact_rows[-1]['best_s']:.3f} s best, NFE {res.nfe}", flush=True)
    ex = exact_rows[0]
    results["sdediff_exact"] = ex
    results["sdediff_exact_by_chunk_size"] = exact_rows

    # baseline
    run_base = lambda: baseline_log_likelihood(score_fn, sde, x, t_start=t_start, rtol=rtol, atol=atol)  # noqa: E731
    ts = []
    for _ in range(b_repeats):
        t, (blogp, bz, bnfe) = timed(run_base, device)
        ts.append(t)
    base = {"nfe": bnfe, **times(ts), **summarize(blogp, bz),
            "max_abs_diff_vs_sdediff_exact_nats": (blogp - exact_ode).abs().max().item()}
    results["baseline_scipy_rk45_loop"] = base
    print(f"baseline: {base['best_s']:.3f} s best, NFE {base['nfe']}", flush=True)
    ratio = ex["best_s"] / base["best_s"]
    ratio_med = ex["median_s"] / base["median_s"]
    accurate = ex["mean_abs_error_nats_per_dim"] <= base["mean_abs_error_nats_per_dim"]
    results["target"] = {"time_ratio_best": ratio, "time_ratio_median": ratio_med, "speedup_best": 1 / ratio,
                         "equal_or_better_accuracy": accurate, "met": bool(ratio <= 0.1 and accurate)}

    # Hutchinson
    hut = []
    for k in probes:
        gen = lambda: torch.Generator(device=device).manual_seed(args.seed + 100 + k)  # noqa: E731
        run_h = lambda: sdediff.log_likelihood(score_fn, sde, x, divergence="hutchinson", probes=k,  # noqa: E731
                                               noise="rademacher", t_start=t_start, rtol=rtol, atol=atol,
                                               generator=gen())
        run_h()  # warm-up
        ts = []
        for _ in range(repeats):
            t, r = timed(run_h, device)
            ts.append(t)
        row = {"probes": k, "nfe": r.nfe, **times(ts), **summarize(r.logp, r.z)}
        if r.stderr is not None:
            zs = (r.logp - exact_ode) / r.stderr
            spread = (r.logp - exact_ode).std().item() / r.stderr.pow(2).mean().sqrt().item()
            row.update({"mean_stderr_nats_per_dim": (r.stderr.mean() / d).item(),
                        "observed_spread_over_rms_stderr": spread,
                        "mean_stderr_nats": r.stderr.mean().item(),
                        "stderr_times_sqrt_k_nats": r.stderr.mean().item() * math.sqrt(k),
                        "z_score_mean": zs.mean().item(), "z_score_std": zs.std().item()})
        hut.append(row)
        print(f"hutchinson K={k}: {row['best_s']:.3f} s best, NFE {row['nfe']}", flush=True)
    t1 = hut[0]["best_s"] if hut and hut[0]["probes"] == 1 else None
    for row in hut:
        row["cost_vs_k1"] = row["best_s"] / t1 if t1 else None
        row["cost_vs_k1_over_k"] = row["cost_vs_k1"] / row["probes"] if t1 else None
    results["sdediff_hutchinson"] = hut

    # table
    print()
    print(f"## Log-likelihood, {n} samples of a {d}-D Gaussian mixture, VPSDE, float64, rtol=atol={rtol:g}, "
          f"t_start={t_start:g}, device={device}, threads={args.threads}")
    print(f"prior mismatch log p_T(z) - log N(z; 0, I): mean {ex['prior_mismatch_nats_per_dim']:+.2e}, "
          f"mean abs {ex['prior_mismatch_abs_nats_per_dim']:.2e} nats/dim")
    print()
    print("| method | NFE | best s | median s | mean abs err (nats/dim) | solver err (nats/dim) |")
    print("|---|---:|---:|---:|---:|---:|")
    named = [(f"sdediff exact, chunk_size={r['chunk_size']}", r) for r in exact_rows]
    for name, r in named + [("baseline (scipy RK45, per-dim autograd)", base)]:
        print(f"| {name} | {r['nfe']} | {r['best_s']:.3f} | {r['median_s']:.3f} | "
              f"{r['mean_abs_error_nats_per_dim']:.2e} | {r['solver_error_nats_per_dim']:.2e} |")
    print()
    for r in exact_rows[1:]:
        print(f"time ratio at chunk_size={r['chunk_size']}: {r['best_s'] / base['best_s']:.3f} (best)")
    print(f"time ratio sdediff (chunk_size={ex['chunk_size']}) / baseline: {ratio:.3f} (best), {ratio_med:.3f} (median) (speedup {1 / ratio:.2f}x); "
          f"accuracy {'equal or better' if accurate else 'WORSE'}; target <= 0.1x: "
          f"{'MET' if results['target']['met'] else 'NOT MET'}")
    print()
    print("| K | NFE | best s | cost vs K=1 | mean abs err (nats/dim) | mean stderr (nats) | stderr*sqrt(K) "
          "| z mean | z std | spread / rms stderr |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in hut:
        se = (f"{r['mean_stderr_nats']:.3f} | {r['stderr_times_sqrt_k_nats']:.3f} | {r['z_score_mean']:+.2f} | "
              f"{r['z_score_std']:.2f} | {r['observed_spread_over_rms_stderr']:.2f}") if "mean_stderr_nats" in r \
            else "- | - | - | - | -"
        cost = f"{r['cost_vs_k1']:.2f}" if r["cost_vs_k1"] is not None else "-"
        print(f"| {r['probes']} | {r['nfe']} | {r['best_s']:.3f} | {cost} | {r['mean_abs_error_nats_per_dim']:.2e} "
              f"| {se} |")

    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / (
        "likelihood_quick.json" if q else "likelihood.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
