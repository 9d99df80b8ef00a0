"""Error against cost (NFE) for every sdediff solver, on an exact 2-D Gaussian mixture.

The data are a mixture of three narrow Gaussians, so the score of every diffused marginal is
known exactly (``GaussianMixture.score_fn``) and the only error left is the solver's.

* ODE solvers (probability-flow ODE) get a *pathwise* error: the RMSE over the batch of
  ``x(t_end)`` against a reference solve from the same prior draws (dopri8, rtol = atol = 1e-10;
  its distance to a 1e-12 solve is printed as a check). Fixed-step solvers run at several step
  counts, adaptive ones at several ``rtol = atol``. "mode err" is the fraction of paths that end
  in another mode than the reference path: a few such flips dominate the RMSE of coarse solves.
* SDE solvers (reverse-time SDE, noise on every step) get a *distributional* error: the sliced
  Wasserstein-1 distance between their samples and 4x as many exact draws from the marginal at
  ``t_end``. "mode err" is the total variation between the fraction of samples in each mode and
  the mixture weights. Both are statistical: the noise floor printed (and drawn) is their mean
  over exact sample sets of the same sizes, so errors near it are not resolved; raise ``--batch``.

Reading the output: NFE counts score (network) evaluations; lower-left is better. In the log-log
plot an ODE solver of order p has slope -p once in its asymptotic regime. For SDE solvers the
"order" column is the strong order for additive noise (``additive_order``, the case of every
reverse diffusion), while the distributional error follows the weak order.
Milstein is Euler-Maruyama for the additive noise of every reverse diffusion (only the noise draws
differ). reversible_heun does badly at every step count here: its leapfrog-like auxiliary state
is unstable on strongly contracting dynamics such as a reverse diffusion.

``--quick`` is a smoke test (seconds); ``--device cuda`` runs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import sdediff  # noqa: E402

SDES = {"vp": lambda: sdediff.VPSDE(), "vp_cosine": lambda: sdediff.VPSDE(schedule="cosine"),
        "subvp": lambda: sdediff.SubVPSDE(), "ve": lambda: sdediff.VESDE()}
MIXTURE = sdediff.GaussianMixture(weights=[0.3, 0.5, 0.2], means=[[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]],
                                  stds=[0.10, 0.15, 0.08])
T_END = 1e-3
REF_TOL, CHECK_TOL = 1e-10, 1e-12
EXACT_FACTOR, FLOOR_DRAWS, PROJECTIONS = 4, 8, 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sde", choices=sorted(SDES), default="vp")
    p.add_argument("--grid", choices=("uniform", "log_snr", "karras", "quadratic"), default="uniform")
    p.add_argument("--batch", type=int, default=None, help="samples per run (default 4000, 500 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: two settings per solver, small batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/compare_solvers.png", help="PNG path; the table goes next to it as .json")
    return p.parse_args(argv)


def settings(info, quick):
    """(label, keyword arguments) of each run of a solver: step counts, or tolerances if adaptive."""
    if info.adaptive:
        tols = (1e-2, 1e-4) if quick else (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
        return [(f"tol={tol:.0e}", dict(rtol=tol, atol=tol)) for tol in tols]
    if info.kind == "ode":  # NFE from about 10 to 500, whatever the cost of a step
        nfes = (12, 48) if quick else (10, 20, 50, 100, 200, 500)
        steps = sorted({max(1, round(n / info.evals_per_step)) for n in nfes})
    else:  # beyond ~200 steps the SDE errors sit on the noise floor of the default batch
        steps = (10, 40) if quick else (5, 10, 20, 50, 100, 200)
    return [(str(n), dict(steps=n)) for n in steps]


def timed(fn, device):
    """``fn()`` and its wall time, synchronizing the GPU around it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


class SlicedW1:
    """Sliced Wasserstein-1 distance from an empirical law ``x: (n, d)`` to a fixed one ``y: (k n, d)``.

    On each random direction the optimal coupling is monotone: it pairs sorted point ``i`` of ``x``
    with sorted points ``k i .. k i + k - 1`` of ``y``. Exact, with no quantile interpolation.
    """

    def __init__(self, y, projections, generator):
        directions = torch.randn(y.shape[1], projections, generator=generator, dtype=torch.float64)
        self.directions = torch.nn.functional.normalize(directions, dim=0).to(y)
        self.sorted_y = self._project(y)

    def _project(self, x):
        return (x @ self.directions).T.contiguous().sort(1).values  # (projections, n): sorting rows is faster

    def __call__(self, x):
        k = self.sorted_y.shape[1] // x.shape[0]
        return (self._project(x).repeat_interleave(k, 1) - self.sorted_y).abs().mean().item()


def modes(mixture, x):
    """Index of the most likely component of each row of ``x: (n, d)``."""
    return mixture.component_log_prob(x).argmax(1)


def mode_weight_tv(mixture, x):
    """Total variation between the fraction of ``x`` in each mode and the mixture weights."""
    freq = torch.bincount(modes(mixture, x), minlength=mixture.num_components).to(x) / x.shape[0]
    return 0.5 * (freq - mixture.weights.to(x)).abs().sum().item()


HEADER = (f"{'solver':<16}{'kind':<5}{'order':>6}  {'steps/tol':<10}{'NFE':>6}{'error':>11}{'mode err':>10}"
          f"{'seconds':>9}")


def format_row(r):
    nfe = "-" if r["nfe"] is None else r["nfe"]
    error = "-" if r["error"] is None else f"{r['error']:.3e}"
    mode = "-" if r["mode_error"] is None else f"{r['mode_error']:.4f}"
    secs = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
    return (f"{r['solver']:<16}{r['kind']:<5}{r['order']:>6g}  {r['setting']:<10}{nfe:>6}{error:>11}"
            f"{mode:>10}{secs:>9}  {r['note']}").rstrip()


def order(info):
    """The order that applies here: the additive-noise strong order for SDE solvers."""
    return info.order if info.additive_order is None else info.additive_order


def solvers(kind):
    """The registered solvers of ``kind``: fixed-step ones first, by order."""
    return sorted(sdediff.available_solvers(kind).items(), key=lambda kv: (kv[1].adaptive, order(kv[1]), kv[0]))


def run_all(kind, sampler, error_fn, device, quick):
    """Every solver of ``kind`` at each of its settings: one printed row of the table per run."""
    rows = []
    print(HEADER)
    for name, info in solvers(kind):
        for label, kwargs in settings(info, quick):
            row = dict(solver=name, kind=kind, order=order(info), setting=label, nfe=None, error=None,
                       mode_error=None, seconds=None, note="")
            try:
                sol, row["seconds"] = timed(lambda: sampler(name, kwargs), device)
                row.update(nfe=sol.nfe, **error_fn(sol.x))
            except sdediff.NonFiniteError as err:
                row["note"] = f"diverged ({err})"
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def plot(rows, floor, title, path):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    for ax, kind, ylabel in zip(axes, ("ode", "sde"), ("pathwise RMSE vs reference", "sliced W1 to exact marginal")):
        for name, info in solvers(kind):
            pts = sorted((r["nfe"], r["error"]) for r in rows if r["solver"] == name and r["error"])
            if pts:
                ax.plot(*zip(*pts), "--" if info.adaptive else "-", marker="o", ms=4, label=f"{name} ({order(info):g})")
        if kind == "sde":
            ax.axhspan(floor[0] - floor[1], floor[0] + floor[1], color="gray", alpha=0.15)
            ax.axhline(floor[0], color="gray", ls=":", label="noise floor (mean ± sd)")
        ax.set(xscale="log", yscale="log", xlabel="NFE (score evaluations)", ylabel=ylabel,
               title=f"{kind.upper()} solvers (order)" + (", dashed: adaptive" if kind == "ode" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    batch = args.batch or (500 if args.quick else 4000)
    device, dtype = torch.device(args.device), torch.float64
    if device.type == "cpu":
        torch.set_num_threads(1)  # tensors of a few thousand numbers: more threads only add overhead
    sde = SDES[args.sde]()
    score_fn, target = MIXTURE.score_fn(sde), MIXTURE.diffused(sde, T_END)
    gen, cpu_gen = torch.Generator(device).manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    common = dict(t_end=T_END, grid=args.grid)
    title = f"{args.sde} SDE, {args.grid} grid, batch {batch}, exact {MIXTURE.num_components}-mode 2-D mixture"
    print(f"compare_solvers: {title}, device {device}\n")

    # ODE solvers: pathwise error against a tight adaptive solve from the same prior draws.
    x_prior = sde.prior_sample((batch, MIXTURE.dim), generator=gen, device=device, dtype=dtype)

    def ode(solver, kwargs):
        return sdediff.sample_ode(score_fn, sde, x_prior, solver=solver, **common, **kwargs)

    def rmse(x, y):
        return (x - y).pow(2).sum(1).mean().sqrt().item()

    ref = ode("dopri8", dict(rtol=REF_TOL, atol=REF_TOL))
    ref_check = rmse(ode("dopri8", dict(rtol=CHECK_TOL, atol=CHECK_TOL)).x, ref.x)
    ref_modes = modes(target, ref.x)
    print(f"ODE reference: dopri8, rtol=atol={REF_TOL:g}, {ref.nfe} NFE; "
          f"RMSE to rtol=atol={CHECK_TOL:g}: {ref_check:.2e}")

    def ode_error(x):
        return dict(error=rmse(x, ref.x), mode_error=(modes(target, x) != ref_modes).double().mean().item())

    rows = run_all("ode", ode, ode_error, device, args.quick)

    # SDE solvers: distributional error against exact draws from the marginal at t_end.
    exact = target.sample(EXACT_FACTOR * batch, generator=cpu_gen, dtype=dtype, device=device)
    sliced_w1 = SlicedW1(exact, PROJECTIONS, cpu_gen)
    floor_sets = [target.sample(batch, generator=cpu_gen, dtype=dtype, device=device) for _ in range(FLOOR_DRAWS)]
    floor_w1 = torch.tensor([sliced_w1(x) for x in floor_sets])
    floor = (floor_w1.mean().item(), floor_w1.std().item())
    mode_floor = sum(mode_weight_tv(target, x) for x in floor_sets) / FLOOR_DRAWS
    print(f"\nSDE noise floor (exact sets of {batch} vs {EXACT_FACTOR * batch}, {FLOOR_DRAWS} draws): "
          f"sliced W1 {floor[0]:.3e} ± {floor[1]:.1e}, mode-weight TV {mode_floor:.4f}")

    def sde_run(solver, kwargs):  # noise on the last step too: the target is the marginal at t_end itself
        return sdediff.sample_sde(score_fn, sde, (batch, MIXTURE.dim), solver=solver, generator=gen, device=device,
                                  dtype=dtype, noise_free_last_step=False, **common, **kwargs)

    def sde_error(x):
        w1 = sliced_w1(x)
        note = "within noise" if w1 < floor[0] + 2 * floor[1] else ""
        return dict(error=w1, mode_error=mode_weight_tv(target, x), note=note)

    rows += run_all("sde", sde_run, sde_error, device, args.quick)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(rows, floor, title, args.out)
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(dict(config=dict(vars(args), batch=batch), reference=dict(nfe=ref.nfe, check_rmse=ref_check),
                       noise_floor=dict(sliced_w1=floor[0], sliced_w1_sd=floor[1], mode_tv=mode_floor), rows=rows),
                  f, indent=1)
    print(f"\nsaved {args.out} and {json_path}")


if __name__ == "__main__":
    main()
