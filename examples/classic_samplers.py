"""The classic samplers on an exact 2-D Gaussian mixture: DDPM, DDIM, annealed Langevin, PC, reverse SDE, ODE.

Every sampler gets the exact score of a three-mode mixture (``GaussianMixture.score_fn``), so
what is left is the sampler's own error plus sampling noise. One figure, one panel per sampler:
its samples over the contours of the exact density, with the number of score evaluations (NFE)
and three accuracy figures in the title, which the script also prints as a table:

* "mode err": the total variation between the fraction of samples in each mode (the most likely
  component of each sample) and the mixture weights;
* "mean err": the Euclidean distance between the sample mean and the mixture mean;
* "logp gap": E[log p(x)] over exact draws minus the mean of log p over the samples, with p the
  exact density. It sees the spread within the modes: positive when the samples are too spread
  out, negative when they are too concentrated (log p has a standard deviation of about 1 here).

All three are statistical. The "exact" row holds the mean of their magnitudes over 20 sets of
exact draws of the same size (its panel shows one set), and "mean se" is the standard error of
the mean, sqrt(trace(cov) / n): errors near these are sampling noise, not the sampler's. With 5000
samples, exact draws have a mode error of about 0.007, a mean error of about 0.024 and a logp gap
of about 0.011.

The VP samplers share one process, ``VPSDE.from_betas`` of DDPM's linear betas (1e-4 to 0.02,
N = 1000), so that DDPM and DDIM run on a model's training timesteps and the reverse SDE and the
probability-flow ODE integrate the same process in continuous time. Annealed Langevin dynamics
and the PC sampler use NCSN's ``VESDE(sigma_min=0.01, sigma_max=50)``. Annealed Langevin runs 20
noise levels rather than NCSN's 10: with 10 levels (of 100 or 300 steps) it puts about 0.484 on
the middle mode instead of 0.5. See docs/classic_samplers.md for the derivations and the sdediff
call of each sampler.

``--quick`` is a smoke test (a few seconds).
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import sdediff  # noqa: E402

MIXTURE = sdediff.GaussianMixture(weights=[0.3, 0.5, 0.2], means=[[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]],
                                  stds=[0.25, 0.35, 0.2])
VP = sdediff.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
VE = sdediff.VESDE(sigma_min=0.01, sigma_max=50.0)
LIMITS = ((-3.4, 3.2), (-3.2, 2.6))
DTYPE = torch.float64
EXACT_DRAWS = 20
REF_DRAWS = 400_000  # exact draws for E[log p]: standard error 1 / sqrt(REF_DRAWS) = 0.0016


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="samples per sampler (default 5000, 1000 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: fewer samples and steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/classic_samplers.png", help="PNG path")
    return p.parse_args(argv)


def samplers(quick):
    """``(key, label, sdediff call, run(shape, generator))`` for each sampler."""
    vp_score, ve_score = MIXTURE.score_fn(VP), MIXTURE.score_fn(VE)
    ddpm_steps, ddim_steps = (100, 20) if quick else (1000, 50)
    levels, per_level = (20, 25) if quick else (20, 100)
    pc_steps, sde_steps, ode_steps = (100, 100, 10) if quick else (500, 500, 25)

    def vp(sampler, **options):
        return lambda shape, g: sampler(vp_score, VP, shape, generator=g, dtype=DTYPE, **options)

    def ve(sampler, **options):
        return lambda shape, g: sampler(ve_score, VE, shape, generator=g, dtype=DTYPE, **options)

    return [
        ("ddpm", f"DDPM, variance beta, {ddpm_steps} steps", f"sample_ddpm(steps={ddpm_steps})",
         vp(sdediff.sample_ddpm, steps=ddpm_steps)),
        ("ddim_eta0", f"DDIM, eta = 0, {ddim_steps} steps", f"sample_ddim(steps={ddim_steps})",
         vp(sdediff.sample_ddim, steps=ddim_steps)),
        ("ddim_eta1", f"DDIM, eta = 1, {ddim_steps} steps", f"sample_ddim(steps={ddim_steps}, eta=1)",
         vp(sdediff.sample_ddim, steps=ddim_steps, eta=1.0)),
        ("ald", f"annealed Langevin (VE), {levels} x {per_level}",
         f"sample_ald(levels={levels}, steps_per_level={per_level})",
         ve(sdediff.sample_ald, levels=levels, steps_per_level=per_level)),
        ("pc", f"PC (VE), {pc_steps} steps", f"sample_pc(steps={pc_steps}, snr=0.16)",
         ve(sdediff.sample_pc, steps=pc_steps, snr=0.16)),
        ("sde", f"reverse SDE (VP), Euler-Maruyama, {sde_steps} steps", f"sample_sde(steps={sde_steps})",
         vp(sdediff.sample_sde, steps=sde_steps)),
        ("ode", f"probability-flow ODE (VP), Heun, {ode_steps} steps", f"sample_ode(steps={ode_steps})",
         vp(sdediff.sample_ode, steps=ode_steps)),
    ]


def mode_error(x):
    """Total variation between the fraction of ``x`` in each mode and the mixture weights."""
    labels = MIXTURE.component_log_prob(x).argmax(1)
    freq = torch.bincount(labels, minlength=MIXTURE.num_components).to(x) / x.shape[0]
    return 0.5 * (freq - MIXTURE.weights.to(x)).abs().sum().item()


def mean_error(x):
    return (x.mean(0) - MIXTURE.mean().to(x)).norm().item()


def logp_gap(x, expected_logp):
    """``E[log p]`` of the mixture minus the mean ``log p`` of ``x``: > 0 too spread, < 0 too concentrated."""
    return expected_logp - MIXTURE.log_prob(x).mean().item()


HEADER = f"{'sampler':<10}{'sdediff call':<46}{'NFE':>6}{'mode err':>10}{'mean err':>10}{'logp gap':>10}{'seconds':>9}"


def format_row(r):
    return (f"{r['key']:<10}{r['call']:<46}{r['nfe']:>6}{r['mode_error']:>10.4f}{r['mean_error']:>10.4f}"
            f"{r['logp_gap']:>+10.4f}{r['seconds']:>9.2f}")


def plot(rows, title, legend, path):
    ncols = 4
    nrows = -(-len(rows) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 4.4 * nrows + 0.4), layout="constrained",
                             sharex=True, sharey=True)
    gx, gy = torch.meshgrid(torch.linspace(*LIMITS[0], 300, dtype=torch.float64),
                            torch.linspace(*LIMITS[1], 300, dtype=torch.float64), indexing="xy")
    logp = MIXTURE.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).reshape(gx.shape)
    levels = (logp.max() - torch.tensor([8.0, 4.0, 2.0, 0.5], dtype=torch.float64)).tolist()
    for ax, r in zip(axes.flat, rows):
        x = r["x"][:2000]  # the same number of points in every panel
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, color="tab:blue", linewidths=0, rasterized=True)
        ax.contour(gx, gy, logp, levels=levels, colors="black", linewidths=0.7, linestyles="solid")
        ax.set_title(f"{r['label']}\nNFE {r['nfe']} | mode {r['mode_error']:.3f} | mean {r['mean_error']:.3f} | "
                     f"logp {r['logp_gap']:+.3f}", fontsize=9)
        ax.set(xlim=LIMITS[0], ylim=LIMITS[1], aspect="equal")
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"{title}\n{legend}", fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    batch = args.batch or (1000 if args.quick else 5000)
    torch.set_num_threads(1)  # tensors of a few thousand numbers: more threads only add overhead
    shape, dtype = (batch, MIXTURE.dim), DTYPE
    se = (MIXTURE.covariance().diagonal().sum() / batch).sqrt().item()
    title = (f"Classic samplers, exact score of a {MIXTURE.num_components}-mode 2-D mixture, {batch} samples each; "
             f"contours: exact density")
    legend = (f"errors against the exact mixture: mode = mode-weight error (TV), mean = |sample mean - mean| "
              f"(standard error {se:.3f}), logp = E[log p] gap (> 0: too spread, < 0: too concentrated)")
    print(f"classic_samplers: {title}\n")
    ref = MIXTURE.sample(REF_DRAWS, generator=torch.Generator().manual_seed(args.seed + 1000), dtype=dtype)
    expected_logp = MIXTURE.log_prob(ref).mean().item()
    print(HEADER)

    rows = []
    for i, (key, label, call, sampler) in enumerate(samplers(args.quick)):
        g = torch.Generator().manual_seed(args.seed + i)
        start = time.perf_counter()
        sol = sampler(shape, g)
        seconds = time.perf_counter() - start
        x = sol.x.to(dtype)
        rows.append(dict(key=key, label=label, call=call, nfe=sol.nfe, mode_error=mode_error(x),
                         mean_error=mean_error(x), logp_gap=logp_gap(x, expected_logp), seconds=seconds, x=x))
        print(format_row(rows[-1]), flush=True)

    draws = [MIXTURE.sample(batch, generator=torch.Generator().manual_seed(args.seed + len(rows) + k), dtype=dtype)
             for k in range(EXACT_DRAWS)]
    rows.append(dict(key="exact", label=f"exact draws (noise level: mean of {EXACT_DRAWS})",
                     call=f"GaussianMixture.sample, mean of {EXACT_DRAWS}", nfe=0,
                     mode_error=sum(map(mode_error, draws)) / EXACT_DRAWS,
                     mean_error=sum(map(mean_error, draws)) / EXACT_DRAWS,
                     logp_gap=sum(abs(logp_gap(x, expected_logp)) for x in draws) / EXACT_DRAWS, seconds=0.0,
                     x=draws[0]))
    print(format_row(rows[-1]))
    print(f"\nmean se (standard error of the mean, sqrt(trace(cov) / n)): {se:.4f}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(rows, title, legend, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
