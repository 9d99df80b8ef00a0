"""Classifier guidance, classifier-free guidance and inpainting on an exact class-conditional 2-D mixture.

The data are a mixture of five Gaussians in three classes (class 0 and class 1 have two modes
each, class 2 one). With the components' labels, ``GaussianMixture`` gives the exact noisy
classifier ``log p_t(y | x)`` (``gm.classifier(sde)``) and the exact class-conditional score
(``gm.conditional_score_fn(sde)``, a negative label giving the unconditional one, as a network
trained with condition dropout would), so what is left is the guidance rule and the sampler.

Guidance targets class 0. Classifier guidance at scale ``w`` adds ``w grad log p_t(y | x)`` to
the score; classifier-free guidance at ``w`` is ``(1 + w) s(x, t, y) - w s(x, t)``, the same as
classifier guidance at ``1 + w``. The "power" column is that exponent ``gamma`` (``w`` or
``1 + w``). At ``gamma = 1`` both sample ``p(x | y)`` exactly. At ``gamma > 1`` the usual reading
is that they sample ``p(x) p(y | x)^gamma``; the "target" rows give that distribution's
statistics (self-normalized importance weighting of exact draws of ``p(x)``). The guided
samplers overshoot it: the guided score at ``t > 0`` is not the score of the diffused sharpened
distribution, and what the samples follow depends on the sampler. At ``gamma = 10`` the target's
mean is (-1.09, 1.45), while the probability-flow ODE's samples have mean (-2.35, 2.36), outside
the target's inner contours, and the reverse SDE's (-1.52, 1.56). Both are converged in the step
count (dopri5 at rtol = 1e-7 and 1000 Euler-Maruyama steps give the same to 0.02): this is what
guidance does, not a solver error. At ``gamma = 1`` all agree with exact draws of ``p(x | y)``.

Columns: "class-0 frac" is the fraction of samples whose most likely class (at t = 0) is 0;
"p(0|x)" the mean of the exact classifier's confidence ``p(y = 0 | x)`` over the samples; "mean
x", "mean y" the sample mean (for ``p(x | y = 0)`` its standard error is about 1 / sqrt(n) per
coordinate).

Inpainting: the x-coordinate is known (``mask = [True, False]``), and ``sample_inpaint`` draws
the y-coordinate by replacement (``resample=1``) and with RePaint's resampling (``resample=10``),
against the exact conditional ``gm.condition_on(mask, known)``, a 1-D mixture. Its upper mode
(y > 0) has the weight printed as "P(y > 0)". Replacement puts about twice that weight there, and
resampling closes only a small part of the gap: the unknown coordinate picks its mode at noise
levels where the known one, replaced by a noisy copy, says little about it.

``--quick`` is a smoke test (a few seconds); ``--device cuda`` runs on a GPU.
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

MIXTURE = sdediff.GaussianMixture(weights=[0.2, 0.15, 0.2, 0.2, 0.25],
                                  means=[[-1.8, 1.0], [0.0, 2.0], [1.8, 1.0], [1.2, -1.5], [-1.0, -1.2]],
                                  stds=[[0.5, 0.45]] * 5, labels=[0, 0, 1, 1, 2])
SDE = sdediff.VPSDE()
TARGET = 0  # the class guided toward
NULL = -1  # the null condition of the "network" (negative labels: the unconditional score)
KNOWN_X = -1.0  # inpainting: the known x-coordinate
DTYPE = torch.float64
REF_DRAWS = 200_000  # exact draws of p(x) for the importance-weighted targets
LIMITS = ((-4.0, 4.0), (-3.5, 4.0))
COLORS = ("tab:blue", "tab:orange", "tab:green")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="samples per setting (default 4000, 1000 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: fewer samples and steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/guidance.png", help="PNG path")
    return p.parse_args(argv)


class ExactEpsNet(torch.nn.Module):
    """Stands in for a trained class-conditional eps-prediction network ``net(x, t, y)``: ``-sigma(t) s(x, t, y)``."""

    def __init__(self, sde):
        super().__init__()
        self.sde, self.score = sde, MIXTURE.conditional_score_fn(sde)

    def forward(self, x, t, y):
        sigma = self.sde.marginal(t)[1][:, None]
        return -sigma * self.score(x, t, y)


def samplers(quick, batch, device):
    """``(key, title, sdediff call, power, run(shape, generator))`` for each guided setting."""
    ode_steps, sde_steps = (20, 100) if quick else (40, 200)
    score = MIXTURE.score_fn(SDE)
    classifier = MIXTURE.classifier(SDE)
    y = torch.full((batch,), TARGET, dtype=torch.long, device=device)

    def ode(score_fn):
        return lambda shape, g: sdediff.sample_ode(score_fn, SDE, shape, steps=ode_steps, t_end=1e-4, generator=g,
                                                   device=device, dtype=DTYPE)

    def sde(score_fn):
        return lambda shape, g: sdediff.sample_sde(score_fn, SDE, shape, steps=sde_steps, t_end=1e-4, generator=g,
                                                   device=device, dtype=DTYPE)

    def cg(w):
        return sdediff.classifier_guidance(score, classifier, y, w)

    # One conditional "network" for both CFG branches: the exact score, and an eps-net through the adapter.
    cond = MIXTURE.conditional_score_fn(SDE)
    eps_net = sdediff.as_score_fn(ExactEpsNet(SDE), SDE, "eps")
    return [
        ("uncond", "unconditional (ODE)", "sample_ode(gm.score_fn(sde))", 0, ode(score)),
        ("cg_w1", "classifier guidance, w = 1 (ODE)", "classifier_guidance(score, gm.classifier(sde), y, 1)", 1,
         ode(cg(1.0))),
        ("cfg_w0", "classifier-free, w = 0 (ODE)", "classifier_free_guidance(cond, scale=0, y=y, null=-1)", 1,
         ode(sdediff.classifier_free_guidance(cond, scale=0.0, y=TARGET, null=NULL))),
        ("cg_w3", "classifier guidance, w = 3 (ODE)", "classifier_guidance(..., 3), sample_ode", 3, ode(cg(3.0))),
        ("cg_w3_sde", "classifier guidance, w = 3 (SDE)", "classifier_guidance(..., 3), sample_sde", 3,
         sde(cg(3.0))),
        ("cfg_w3", "classifier-free, w = 3, eps-net (ODE)", "classifier_free_guidance(as_score_fn(net), scale=3)", 4,
         ode(sdediff.classifier_free_guidance(eps_net, scale=3.0, y=TARGET, null=NULL))),
        ("cg_w10", "classifier guidance, w = 10 (ODE)", "classifier_guidance(..., 10), sample_ode", 10, ode(cg(10.0))),
        ("cg_w10_sde", "classifier guidance, w = 10 (SDE)", "classifier_guidance(..., 10), sample_sde", 10,
         sde(cg(10.0))),
    ]


def class_stats(x, weights=None):
    """``(class-0 fraction, mean p(0 | x), mean)`` of ``x``, optionally self-normalized-weighted."""
    log_p = MIXTURE.class_log_prob(None, x)
    if weights is None:
        weights = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype, device=x.device)
    frac = (weights * (log_p.argmax(1) == TARGET)).sum().item()
    conf = (weights * log_p[:, TARGET].exp()).sum().item()
    return frac, conf, (weights[:, None] * x).sum(0).tolist()


def sharpened_target(ref, power):
    """Statistics of ``p(x) p(y | x)^power``: exact draws ``ref`` of ``p(x)`` weighted by ``p(y | x)^power``."""
    weights = torch.softmax(power * MIXTURE.class_log_prob(None, ref)[:, TARGET], 0)
    return class_stats(ref, weights)


HEADER = (f"{'setting':<12}{'sdediff call':<54}{'power':>6}{'NFE':>6}{'class-0 frac':>13}{'p(0|x)':>9}"
          f"{'mean x':>9}{'mean y':>9}{'seconds':>9}")


def format_row(r):
    return (f"{r['key']:<12}{r['call']:<54}{r['power']:>6}{r['nfe']:>6}{r['frac']:>13.4f}{r['conf']:>9.4f}"
            f"{r['mean'][0]:>9.3f}{r['mean'][1]:>9.3f}{r['seconds']:>9.2f}")


INPAINT_HEADER = (f"{'setting':<12}{'sdediff call':<54}{'NFE':>6}{'P(y > 0)':>10}{'mean y|y>0':>12}{'mean y|y<0':>12}"
                  f"{'seconds':>9}")


def mode_stats(u):
    """``(P(u > 0), mean of u > 0, mean of u < 0)`` of 1-D samples ``u``."""
    up = u > 0
    return up.double().mean().item(), u[up].mean().item(), u[~up].mean().item()


def format_inpaint_row(r):
    return (f"{r['key']:<12}{r['call']:<54}{r['nfe']:>6}{r['up']:>10.4f}{r['mean_up']:>12.3f}{r['mean_low']:>12.3f}"
            f"{r['seconds']:>9.2f}")


def plot_density(ax, power):
    """Contours of ``p(x) p(y = 0 | x)^power`` (``power = 0``: the data density)."""
    gx, gy = torch.meshgrid(torch.linspace(*LIMITS[0], 250, dtype=DTYPE), torch.linspace(*LIMITS[1], 250, dtype=DTYPE),
                            indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1)
    logp = MIXTURE.log_prob(grid) + power * MIXTURE.class_log_prob(None, grid)[:, TARGET]
    logp = logp.reshape(gx.shape)
    levels = (logp.max() - torch.tensor([8.0, 4.0, 2.0, 0.5], dtype=DTYPE)).tolist()
    ax.contour(gx, gy, logp, levels=levels, colors="black", linewidths=0.7, linestyles="solid")


def plot(panels, inpaint_rows, cond, title, path):
    fig, axes = plt.subplots(3, 3, figsize=(13, 13.6), layout="constrained")
    for ax, p in zip(axes.flat, panels):
        x = p["x"][:2000]
        cls = MIXTURE.class_log_prob(None, x).argmax(1)
        for c in range(MIXTURE.num_classes):
            pts = x[cls == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, color=COLORS[c], linewidths=0, rasterized=True,
                       label=f"class {c}")
        plot_density(ax, p["power"])
        ax.set_title(f"{p['title']}\nclass-0 frac {p['frac']:.3f} | p(0|x) {p['conf']:.3f} "
                     f"(target {p['target_conf']:.3f})", fontsize=9)
        ax.set(xlim=LIMITS[0], ylim=LIMITS[1], aspect="equal")
    first = axes.flat[0]
    first.axvline(KNOWN_X, color="gray", linestyle="--", linewidth=1)
    first.legend(loc="upper right", markerscale=4, fontsize=8)

    ax = axes.flat[len(panels)]
    grid = torch.linspace(-3.0, 3.5, 400, dtype=DTYPE)
    ax.plot(grid, cond.log_prob(grid[:, None]).exp(), color="black", linewidth=1.5, label="exact p(y | x)")
    for r, color in zip(inpaint_rows[:2], ("tab:red", "tab:purple")):
        ax.hist(r["u"], bins=60, range=(-3.0, 3.5), density=True, histtype="step", color=color, linewidth=1.2,
                label=f"{r['title']}: P(y>0) {r['up']:.3f}")
    ax.axvline(0.0, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="y", ylabel="density")
    ax.set_title(f"inpainting: y given x = {KNOWN_X} (dashed line in the first panel)\n"
                 f"exact P(y > 0) = {inpaint_rows[2]['up']:.3f}", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    batch = args.batch or (1000 if args.quick else 4000)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tensors of a few thousand numbers: more threads only add overhead
    shape = (batch, MIXTURE.dim)
    title = (f"Guidance toward class {TARGET} on an exact {MIXTURE.num_classes}-class 2-D mixture, {batch} samples "
             f"each; colour: most likely class; contours: p(x) p(y=0|x)^power")
    print(f"guidance: {title}, device {device}\n")
    ref = MIXTURE.sample(REF_DRAWS, generator=torch.Generator(device).manual_seed(args.seed + 1000), dtype=DTYPE,
                         device=device)
    settings = samplers(args.quick, batch, device)
    targets = {power: sharpened_target(ref, power) for power in sorted({s[3] for s in settings})}

    # Exact draws of p(x | y): what power 1 must give.
    g = torch.Generator(device).manual_seed(args.seed)
    start = time.perf_counter()
    exact = MIXTURE.conditional(TARGET).sample(batch, generator=g, dtype=DTYPE, device=device)
    frac, conf, mean = class_stats(exact)
    exact_row = dict(key="exact", title=f"exact draws of p(x | y = {TARGET})",
                     call=f"gm.conditional({TARGET}).sample(n)", power=1, nfe=0, frac=frac, conf=conf, mean=mean,
                     seconds=time.perf_counter() - start, x=exact)

    # Warm up torch.func (its first call takes about a second) so that the seconds compare.
    torch.func.grad(lambda x: MIXTURE.classifier(SDE)(x, x.new_ones(1), 0).sum())(ref[:1])

    print(HEADER)
    rows = []
    for i, (key, label, call, power, run) in enumerate(settings):
        if power >= 1 and (not rows or rows[-1]["power"] != power):  # the target first: exact draws at power 1
            frac, conf, mean = targets[power]
            rows.append(exact_row if power == 1 else dict(
                key=f"target_{power}", call=f"p(x) p(y|x)^{power}: exact draws, importance-weighted", power=power,
                nfe=0, frac=frac, conf=conf, mean=mean, seconds=0.0))
            print(format_row(rows[-1]))
        g = torch.Generator(device).manual_seed(args.seed + 1 + i)
        start = time.perf_counter()
        sol = run(shape, g)
        seconds = time.perf_counter() - start
        frac, conf, mean = class_stats(sol.x)
        rows.append(dict(key=key, title=label, call=call, power=power, nfe=sol.nfe, frac=frac, conf=conf, mean=mean,
                         seconds=seconds, x=sol.x))
        print(format_row(rows[-1]), flush=True)

    # CFG at w is classifier guidance at 1 + w: check it on noisy points.
    t = torch.linspace(0.01, 1.0, 1000, dtype=DTYPE, device=device)
    noise = torch.randn(1000, 2, generator=torch.Generator(device).manual_seed(args.seed + 50), dtype=DTYPE,
                        device=device)
    xt = SDE.perturb(ref[:1000], t, noise)
    y = torch.full((1000,), TARGET, device=device)
    cfg = sdediff.classifier_free_guidance(MIXTURE.conditional_score_fn(SDE), scale=3.0, y=y, null=NULL)(xt, t)
    cg = sdediff.classifier_guidance(MIXTURE.score_fn(SDE), MIXTURE.classifier(SDE), y, 4.0)(xt, t)
    print(f"\ncheck: max |CFG(w = 3) - classifier guidance(w = 4)| / max |.| on 1000 noisy points: "
          f"{((cfg - cg).abs().max() / cg.abs().max()).item():.1e}")

    # Inpainting: y given x = KNOWN_X.
    steps, jump = (50, 10) if args.quick else (100, 10)
    mask = torch.tensor([True, False], device=device)
    known = torch.tensor([KNOWN_X, 0.0], dtype=DTYPE, device=device)
    cond = MIXTURE.condition_on(mask.cpu(), known.cpu())
    print(f"\ninpainting: y given x = {KNOWN_X}, ancestral sampler, {steps} steps, jump_length {jump}; "
          f"exact conditional: gm.condition_on(mask, known)")
    print(INPAINT_HEADER)
    inpaint_rows = []
    for r in (1, 10):
        g = torch.Generator(device).manual_seed(args.seed + 100 + r)
        start = time.perf_counter()
        sol = sdediff.sample_inpaint(MIXTURE.score_fn(SDE), SDE, shape, known=known, mask=mask, steps=steps,
                                     jump_length=jump, resample=r, generator=g, device=device, dtype=DTYPE)
        seconds = time.perf_counter() - start
        u = sol.x[:, 1]
        up, mean_up, mean_low = mode_stats(u)
        inpaint_rows.append(dict(key=f"inpaint_r{r}", title=f"resample = {r}",
                                 call=f"sample_inpaint(..., resample={r})", nfe=sol.nfe, up=up, mean_up=mean_up,
                                 mean_low=mean_low, seconds=seconds, u=u.cpu()))
        print(format_inpaint_row(inpaint_rows[-1]), flush=True)
    exact_u = cond.sample(REF_DRAWS, generator=torch.Generator().manual_seed(args.seed + 2000), dtype=DTYPE)[:, 0]
    weight_up = (cond.weights * torch.special.ndtr(cond.means[:, 0] / cond.stds[:, 0])).sum().item()
    _, mean_up, mean_low = mode_stats(exact_u)
    inpaint_rows.append(dict(key="exact_cond", call="gm.condition_on(mask, known) (mode means: draws)", nfe=0,
                             up=weight_up, mean_up=mean_up, mean_low=mean_low, seconds=0.0))
    print(format_inpaint_row(inpaint_rows[-1]))

    by_key = {r["key"]: r for r in rows}
    panels = []
    for key in ("uncond", "exact", "cg_w1", "cg_w3", "cg_w10", "cg_w10_sde", "cfg_w0", "cfg_w3"):
        r = dict(by_key[key], x=by_key[key]["x"].cpu())
        r["target_conf"] = targets[r["power"]][1]
        panels.append(r)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(panels, inpaint_rows, cond, title, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
