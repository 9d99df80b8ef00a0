"""Train a small MLP on a 2-D Gaussian mixture with one of sdediff's training objectives, then check it.

The data are a three-mode mixture with weights (0.2, 0.3, 0.5), whose score is known exactly at
every noise level (``GaussianMixture.marginal_score``), so a trained model can be compared with
the truth instead of being judged by eye. ``--objective`` picks the recipe (the network and the
hyperparameters are those of tests/test_training.py: a 3-layer MLP, 128 wide, with sinusoidal
time features; Adam with a one-cycle learning rate; batches of 512):

* ``dsm-eps``: ``dsm_loss(parameterization="eps", weighting="simple")``, DDPM's loss (default);
* ``dsm-score``: ``dsm_loss(parameterization="score", weighting="sigma2")`` with score_sde's
  scale-by-sigma network ``net(x, t) / sigma(t)``;
* ``dsm-likelihood``: ``dsm_loss(parameterization="v", weighting="likelihood",
  importance_sampling=True)``, the likelihood weighting with t drawn uniformly in log-SNR;
* ``ssm``: sliced score matching with variance reduction (``ssm_loss``) on noisy data at random t,
  weighted by sigma^2; noisier gradients, so 2500 steps;
* ``hybrid``: improved DDPM, ``hybrid_loss`` with a learned variance on 200 cosine timesteps,
  timesteps drawn by ``LossHistorySampler``; sampled by ``sample_ddpm(LearnedVariance(net, sde),
  ...)`` with the learned variance;
* ``ct`` / ``cd``: consistency training (no teacher) and distillation (the exact score as the
  teacher, Heun steps), N = 18, EMA 0.99, on ``EDMSDE`` (sigma(t) = t); sampled with
  ``sample_consistency`` in two steps (80, 0.8) for CT and one step for CD.

The printed table reports

* "score err": ``E_t E_x sigma(t)^2 ||s_theta(x, t) - s(x, t)||^2 / d`` against the exact score,
  ``t ~ U[0.01, T]`` and ``x ~ p_t`` (the error in eps units), next to the same for the zero score
  ("zero err", 0.82 on VP, 0.68 on the hybrid recipe's cosine schedule). Consistency models have
  no score: their row shows "-", and a line below the table gives the error of the one-step map
  ``f_theta(x, t)`` against the exact ``f(x, t)`` (the probability-flow ODE of the exact score
  solved to t = 0.002 by dopri5) at t = 0.5 and 2, next to that of the identity map ``f = x``;
* the fraction of the samples in each mode (the most likely component) and the largest deviation
  from the weights, next to the same for as many exact draws (the sampling noise, about 0.02).

The figure shows the samples over exact draws (left), and the learned against the exact field at
two noise levels: ``sigma(t) s(x, t)`` (the negative eps prediction) for the score models, the
displacement ``f(x, t) - x`` of the one-step map for the consistency models (which have no score).

Measured with the default steps (CPU, one thread; seconds of training, score error, largest
mode-weight error): dsm-eps 5 s, 0.0023, 0.016; dsm-score 6 s, 0.0026, 0.023; dsm-likelihood
6 s, 0.0018, 0.020; ssm 18 s, 0.0032, 0.008; hybrid 11 s, 0.0025, 0.004; ct 8 s, map errors
0.006 / 0.11 (identity 0.10 / 2.1), 0.017; cd 22 s, 0.002 / 0.012, 0.007 (see docs/training.md).

``--quick`` is a smoke test (500 steps, a few seconds); ``--device cuda`` runs on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import sdediff  # noqa: E402
from sdediff import TimeMLP  # noqa: E402

MIXTURE = sdediff.GaussianMixture([0.2, 0.3, 0.5], [[-1.5, -1.0], [1.5, -1.0], [0.0, 1.2]], [0.25, 0.3, 0.2])
VP = sdediff.VPSDE()
EDM = sdediff.EDMSDE()
HYBRID_STEPS = 200  # discrete timesteps of the improved-DDPM recipe
BATCH = 512
LIMITS = ((-3.0, 3.0), (-2.5, 2.5))
OBJECTIVES = ("dsm-eps", "dsm-score", "dsm-likelihood", "ssm", "hybrid", "ct", "cd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objective", choices=OBJECTIVES, default="dsm-eps")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default 1500; ssm 2500; ct, cd 2000; 500 with --quick)")
    p.add_argument("--samples", type=int, default=None, help="samples drawn for the check (default 4000, 2000 quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: 500 training steps, fewer samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="outputs/train_toy.png", help="PNG path")
    return p.parse_args(argv)


class DiscreteMLP(TimeMLP):
    """``net(x, n)`` on integer timesteps ``n = 0 .. N-1`` (time feature ``(n + 1) / N``), as iDDPM's networks."""

    def __init__(self, num_timesteps: int, out: int):
        super().__init__(2, out)
        self.num_timesteps = num_timesteps

    def forward(self, x, n):
        return super().forward(x, (n.to(x.dtype) + 1.0) / self.num_timesteps)


@dataclass
class Recipe:
    """What an objective needs: the module trained, its per-sample loss, and how to use the result."""

    call: str  # the sdediff call, for the printout
    sde: sdediff.SDE
    module: torch.nn.Module  # the parameters optimized
    loss: Callable  # (x0, generator) -> per-sample loss (batch,)
    steps: int
    lr: float
    score_fn: Callable | None = None  # trained score (None for consistency models)
    sample: Callable | None = None  # (n, generator, device) -> samples
    one_step: Callable | None = None  # consistency models: the trained f(x, t)


def sigma_of(sde, t):
    return sde.marginal(t)[1][:, None]


def dsm_recipe(device, parameterization, weighting, importance_sampling=False, scale_by_sigma=False):
    net = TimeMLP().to(device)
    # score_sde's scale_by_sigma: a score network net(x, t) / sigma(t) is well scaled at every t
    model = (lambda x, t: net(x, t) / sigma_of(VP, t)) if scale_by_sigma else net
    options = dict(parameterization=parameterization, weighting=weighting)
    if importance_sampling:
        options["importance_sampling"] = True
    call = "dsm_loss(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"
    score_fn = sdediff.as_score_fn(model, VP, parameterization)
    return Recipe(call + (", net / sigma" if scale_by_sigma else ""), VP, net,
                  lambda x0, g: sdediff.dsm_loss(model, VP, x0, t_min=1e-3, generator=g, **options), 1500, 3e-3,
                  score_fn=score_fn, sample=ode_sampler(score_fn))


def ode_sampler(score_fn):
    def sample(n, g, device):
        return sdediff.sample_ode(score_fn, VP, (n, 2), steps=40, solver="dpmpp_2m", generator=g, device=device).x

    return sample


def ssm_recipe(device):
    net = TimeMLP().to(device)  # predicts eps: score = -net / sigma

    def loss(x0, g):
        t = 0.01 + 0.99 * torch.rand(x0.shape[0], generator=g, device=x0.device)
        sigma = sigma_of(VP, t)
        xt = VP.perturb(x0, t, torch.randn(x0.shape, generator=g, device=x0.device))
        return sigma[:, 0] ** 2 * sdediff.ssm_loss(lambda x: -net(x, t) / sigma, xt, variance_reduction=True,
                                                   generator=g)

    score_fn = sdediff.as_score_fn(net, VP, "eps")
    return Recipe("sigma^2 ssm_loss(variance_reduction=True) at random t", VP, net, loss, 2500, 3e-3,
                  score_fn=score_fn, sample=ode_sampler(score_fn))


def hybrid_recipe(device, cpu_generator):
    N = HYBRID_STEPS
    sde = sdediff.VPSDE.from_betas(sdediff.CosineSchedule().discrete_betas(N))
    history = sdediff.LossHistorySampler(N)
    net = DiscreteMLP(N, out=4).to(device)  # (eps, v): 2 + 2 channels

    def loss(x0, g):
        # The history sampler draws on the CPU (its probabilities live there): it takes a CPU generator.
        n, weights = history.sample(x0.shape[0], generator=cpu_generator, device=x0.device)
        # low/high: the decoder's bins cover the data's range (the mixture is not in [-1, 1])
        out = sdediff.hybrid_loss(net, sde, x0, timesteps=n, low=-3.0, high=3.0, generator=g)
        history.update(n, out.loss)
        return out.loss * weights.to(out.loss.dtype)

    model = sdediff.LearnedVariance(net, sde)
    return Recipe(f"hybrid_loss + LossHistorySampler, cosine, N = {N}", sde, net, loss, 1500, 3e-3,
                  score_fn=model,
                  sample=lambda n, g, device: sdediff.sample_ddpm(model, sde, (n, 2), generator=g, device=device).x)


def consistency_recipe(device, distill):
    # EDM's times in [0.002, 80]: log-time features, input scaled by 1 / sqrt(sigma_data^2 + t^2)
    f = sdediff.ConsistencyFunction(TimeMLP(log_time=True, sigma_data=0.5)).to(device)
    f_ema = copy.deepcopy(f)
    teacher = MIXTURE.score_fn(EDM)

    def loss(x0, g):
        if distill:
            out = sdediff.consistency_distillation_loss(f, f_ema, teacher, x0, N=18, solver="heun", generator=g)
        else:
            out = sdediff.consistency_training_loss(f, f_ema, x0, N=18, generator=g)
        sdediff.ema_update(f_ema, f, 0.99)  # after the loss: the target is the EMA of the previous steps
        return out

    times = (80.0,) if distill else (80.0, 0.8)
    name = "consistency_distillation_loss(exact score, heun)" if distill else "consistency_training_loss"
    return Recipe(f"{name}, N = 18, EMA 0.99, sampled at {times}", EDM, f, loss, 2000, 2e-3,
                  sample=lambda n, g, device: sdediff.sample_consistency(f_ema.eval(), (n, 2), times=times,
                                                                        generator=g, device=device).x,
                  one_step=f_ema)


def make_recipe(objective, device, cpu_generator):
    """The recipe of ``objective``, its networks on ``device``."""
    if objective == "dsm-eps":
        return dsm_recipe(device, "eps", "simple")
    if objective == "dsm-score":
        return dsm_recipe(device, "score", "sigma2", scale_by_sigma=True)
    if objective == "dsm-likelihood":
        return dsm_recipe(device, "v", "likelihood", importance_sampling=True)
    if objective == "ssm":
        return ssm_recipe(device)
    if objective == "hybrid":
        return hybrid_recipe(device, cpu_generator)
    return consistency_recipe(device, distill=objective == "cd")


def train(recipe, steps, generator, device):
    """Adam with a one-cycle schedule; a tqdm bar shows the mean loss of the last 100 steps."""
    opt = torch.optim.Adam(recipe.module.parameters(), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.1)
    recent = deque(maxlen=100)
    recipe.module.train()
    with tqdm(range(steps), desc="training", mininterval=0.5) as bar:
        for step in bar:
            x0 = MIXTURE.sample(BATCH, generator=generator, dtype=torch.float32, device=device)
            loss = recipe.loss(x0, generator).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            recent.append(loss.item())
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
    recipe.module.eval()
    return sum(recent) / len(recent)


@torch.no_grad()
def score_error(score_fn, sde, device, n=4000, seed=123):
    """``E sigma^2 ||s_theta - s||^2 / d`` and the same for ``s_theta = 0``, over ``t ~ U[0.01, T]``, ``x ~ p_t``."""
    g = torch.Generator(device).manual_seed(seed)
    x0 = MIXTURE.sample(n, generator=g, dtype=torch.float32, device=device)
    t = 0.01 + (sde.T - 0.01) * torch.rand(n, generator=g, device=device)
    xt = sde.perturb(x0, t, torch.randn(x0.shape, generator=g, device=device))
    sigma = sigma_of(sde, t)
    exact = MIXTURE.marginal_score(sde, xt, t)
    return (((sigma * (score_fn(xt, t) - exact)) ** 2).mean().item(), ((sigma * exact) ** 2).mean().item())


@torch.no_grad()
def exact_one_step(x, t):
    """The exact consistency map on EDM: the probability-flow ODE of the exact score from t to 0.002."""
    x = x.double()
    return sdediff.sample_ode(MIXTURE.score_fn(EDM), EDM, x, solver="dopri5", t_start=t, t_end=0.002,
                              rtol=1e-6, atol=1e-6).x


@torch.no_grad()
def map_error(f, t, device, n=2000, seed=321):
    """``E ||f_theta(x, t) - f(x, t)||^2 / d`` over ``x ~ p_t``, and the same for the identity ``f = x``."""
    g = torch.Generator(device).manual_seed(seed)
    x = MIXTURE.diffused(EDM, t).sample(n, generator=g, dtype=torch.float32, device=device)
    exact = exact_one_step(x, t)
    learned = f(x, torch.full((n,), t, device=device)).double()
    return ((learned - exact) ** 2).mean().item(), ((x.double() - exact) ** 2).mean().item()


def mode_weights(x):
    labels = MIXTURE.component_log_prob(x.double()).argmax(1)
    return (torch.bincount(labels, minlength=MIXTURE.num_components).double() / len(x)).cpu()


def plot(recipe, objective, samples, exact, levels, path, device):
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2), layout="constrained")
    gx, gy = torch.meshgrid(torch.linspace(*LIMITS[0], 200, dtype=torch.float64),
                            torch.linspace(*LIMITS[1], 200, dtype=torch.float64), indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1)

    def contours(ax, sde=None, t=None):
        logp = (MIXTURE.log_prob(grid) if sde is None else MIXTURE.marginal_log_prob(sde, grid, t)).reshape(gx.shape)
        ax.contour(gx, gy, logp, levels=(logp.max() - torch.tensor([6.0, 3.0, 1.0])).tolist(), colors="0.6",
                   linewidths=0.7, linestyles="solid")

    ax = axes[0]
    ax.scatter(exact[:2000, 0], exact[:2000, 1], s=2, color="0.5", alpha=0.5, linewidths=0, label="exact draws",
               rasterized=True)
    ax.scatter(samples[:2000, 0], samples[:2000, 1], s=2, color="tab:blue", alpha=0.5, linewidths=0,
               label="model samples", rasterized=True)
    contours(ax)
    ax.legend(loc="lower right", markerscale=4, fontsize=8)
    ax.set_title(f"{objective}: samples vs exact draws")

    qx, qy = torch.meshgrid(torch.linspace(*LIMITS[0], 17), torch.linspace(*LIMITS[1], 15), indexing="xy")
    q = torch.stack([qx.flatten(), qy.flatten()], 1).to(device)
    for ax, t in zip(axes[1:], levels):
        tt = torch.full((q.shape[0],), t, device=device)
        with torch.no_grad():
            if recipe.one_step is None:  # sigma(t) s(x, t): the negative eps prediction, bounded at every t
                sigma = sigma_of(recipe.sde, tt)
                learned = sigma * recipe.score_fn(q, tt)
                truth = sigma * MIXTURE.marginal_score(recipe.sde, q, tt)
                what, noise = "sigma(t) * score", sigma[0, 0].item()
            else:  # consistency models have no score: the one-step map's displacement f(x, t) - x
                learned = recipe.one_step(q, tt) - q
                truth = exact_one_step(q, t).to(q) - q
                what, noise = "one-step map f(x, t) - x", t
        learned, truth, qc = learned.cpu(), truth.cpu(), q.cpu()
        contours(ax, recipe.sde, t)
        scale = truth.norm(dim=1).max().item() / 0.5  # the longest exact arrow spans 0.5 axis units
        for field, color, label in ((truth, "black", "exact"), (learned, "tab:red", "learned")):
            ax.quiver(qc[:, 0], qc[:, 1], field[:, 0], field[:, 1], color=color, angles="xy", scale_units="xy",
                      scale=scale, width=0.004, alpha=0.8, label=label)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{what} at t = {t:g} (sigma = {noise:.2f})")
    for ax in axes:
        ax.set(xlim=LIMITS[0], ylim=LIMITS[1], aspect="equal")
    fig.suptitle(f"train_toy: {recipe.call}; contours: exact density (of x_t in the field panels)", fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(value, width, spec):
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def row(name, steps, seconds, loss, err, base, weights):
    dev = (weights - MIXTURE.weights).abs().max().item()
    ratio = None if err is None else err / base
    return (f"{name:<16}{fmt(steps, 6, 'd')}{fmt(seconds, 9, '.1f')}{fmt(loss, 11, '.4f')}{fmt(err, 11, '.5f')}"
            f"{fmt(base, 10, '.4f')}{fmt(ratio, 8, '.4f')}  " + " ".join(f"{w:.3f}" for w in weights.tolist())
            + f"{dev:>10.4f}")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # a 128-wide MLP on 512 points: more threads only add overhead
    torch.manual_seed(args.seed)  # the network's initialization
    g = torch.Generator(device).manual_seed(args.seed)
    recipe = make_recipe(args.objective, device, torch.Generator().manual_seed(args.seed + 1))
    steps = args.steps or (500 if args.quick else recipe.steps)
    n = args.samples or (2000 if args.quick else 4000)
    print(f"train_toy: {args.objective}: {recipe.call}; {steps} steps of {BATCH}, lr {recipe.lr:g}, device {device}\n")

    start = time.perf_counter()
    final_loss = train(recipe, steps, g, device)
    seconds = time.perf_counter() - start

    with torch.no_grad():
        samples = recipe.sample(n, torch.Generator(device).manual_seed(args.seed + 7), device).float().cpu()
    exact = MIXTURE.sample(n, generator=torch.Generator().manual_seed(args.seed + 8), dtype=torch.float32)
    if recipe.score_fn is not None:
        err, base = score_error(recipe.score_fn, recipe.sde, device)
        levels, extra = (0.05, 0.3), ""
    else:
        levels = (0.5, 2.0)
        maps = [map_error(recipe.one_step, t, device) for t in levels]
        err, base = None, None
        extra = ("\none-step map error E||f_theta(x, t) - f(x, t)||^2 / d over x ~ p_t (identity map f = x): "
                 + ", ".join(f"t = {t:g}: {e:.4f} ({b:.4f})" for t, (e, b) in zip(levels, maps)))

    w = " ".join(f"{v:.2f}" for v in MIXTURE.weights.tolist())
    print(f"\n{'':<16}{'steps':>6}{'train s':>9}{'last loss':>11}{'score err':>11}{'zero err':>10}{'ratio':>8}  "
          f"{'mode weights':<16}{'max dev':>10}")
    print(row(args.objective, steps, seconds, final_loss, err, base, mode_weights(samples)))
    print(row("exact draws", None, None, None, None, None, mode_weights(exact)))
    print(f"\nmixture weights {w}; score err: E_t E_x sigma^2 ||s_theta - s||^2 / d, t ~ U[0.01, T]; "
          f"zero err: the same for s_theta = 0; last loss: mean of the last 100 steps{extra}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(recipe, args.objective, samples, exact, levels, args.out, device)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
