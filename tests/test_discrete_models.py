"""Discrete-time model adapters: ``discrete_score_fn`` and ``from_diffusers``.

A network trained on N discrete timesteps sees ``model(x, n)``; sdediff maps time ``t`` to
``n = N t - 1`` (timestep ``n`` sits at ``t = (n + 1) / N``, where ``alpha(t)^2`` of
``VPSDE.from_betas(betas)`` equals ``alphas_cumprod[n]``), rounded and clamped into ``0 .. N-1``.
The "exact" discrete models here predict the eps / x0 / v of a Gaussian mixture at
``alpha_n = sqrt(alphas_cumprod[n])``, ``sigma_n = sqrt(1 - alphas_cumprod[n])``, computed from the
mixture's parameters by Gaussian conditioning (not through sdediff), so the adapted score must be
the mixture's exact score at the knot times, to float64 round-off.
"""

import pytest
import torch

from sdediff import (VESDE, VPSDE, GaussianMixture, LearnedVariance, discrete_score_fn, from_diffusers,
                     sample_ddpm)

from mixture_checks import mixture_eps_x0

F64 = torch.float64
N = 50  # training timesteps: small, so the schedule ends at alphas_cumprod[N-1] ~ 4e-6 (alpha ~ 2e-3)
BETAS = torch.linspace(0.1 / N, 20.0 / N, N, dtype=F64)  # Ho et al.'s linear schedule, N steps (conftest.ddpm_linear_betas)


def _mixture():
    g = torch.Generator().manual_seed(0)
    means = 1.5 * torch.randn(3, 3, generator=g, dtype=F64)
    stds = 0.3 + torch.rand(3, 3, generator=g, dtype=F64)
    return GaussianMixture([0.2, 0.3, 0.5], means, stds)


def _sde():
    return VPSDE.from_betas(BETAS)


def _alphas_cumprod():
    return torch.cumprod(1.0 - BETAS, 0)


def _bc(c, x):
    return c.reshape(c.shape + (1,) * (x.dim() - 1))


def _predict(gm, x, alpha, sigma, prediction):
    eps, x0 = mixture_eps_x0(gm, x, alpha, sigma)
    a, s = _bc(alpha, x), _bc(sigma, x)
    return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]


def exact_discrete_model(gm, prediction, calls=None):
    """``model(x, n)``, ``n`` integer ``(batch,)``: the mixture's exact prediction at ``alphas_cumprod[n]``."""
    abar = _alphas_cumprod()

    def model(x, n):
        if calls is not None:
            calls.append(n.clone())
        a2 = abar[n]
        return _predict(gm, x, a2.sqrt(), (1.0 - a2).sqrt(), prediction)

    return model


def _inputs(n_times, scale=2.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n_times, 3, generator=g, dtype=F64)


def test_exact_discrete_model_is_consistent():
    """The test's own model: x = alpha x0 + sigma eps, and eps = -sigma * (the mixture's score)."""
    gm, sde = _mixture(), _sde()
    n = torch.arange(N)
    x = _inputs(N)
    abar = _alphas_cumprod()[n]
    alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
    eps, x0 = mixture_eps_x0(gm, x, alpha, sigma)
    torch.testing.assert_close(_bc(alpha, x) * x0 + _bc(sigma, x) * eps, x, rtol=1e-12, atol=1e-12)
    score = gm.marginal_score(sde, x, (n.to(F64) + 1.0) / N)
    torch.testing.assert_close(-_bc(sigma, x) * score, eps, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_discrete_score_equals_mixture_score_at_knots(prediction):
    """At ``t = (n + 1) / N`` the adapted score is the exact score of the diffused mixture (float64)."""
    gm, sde = _mixture(), _sde()
    n = torch.arange(N)
    t = (n.to(F64) + 1.0) / N
    x = _inputs(N)
    calls = []
    score = discrete_score_fn(exact_discrete_model(gm, prediction, calls), sde, prediction)(x, t)
    exact = gm.marginal_score(sde, x, t)
    assert score.shape == x.shape and score.dtype == F64
    # relative to the score's scale: x0 and v go through a division by alpha ~ 2e-3 at n = N-1
    torch.testing.assert_close(score, exact, rtol=1e-10, atol=1e-10 * exact.abs().max().item())
    assert len(calls) == 1 and calls[0].dtype == torch.long and torch.equal(calls[0], n)


def test_discrete_score_predictions_are_not_interchangeable():
    """A model read with the wrong prediction type gives a wrong score: the check above can fail."""
    gm, sde = _mixture(), _sde()
    t = (torch.arange(N, dtype=F64) + 1.0) / N
    x = _inputs(N)
    exact = gm.marginal_score(sde, x, t)
    for given, claimed in [("eps", "x0"), ("x0", "v"), ("v", "eps")]:
        wrong = discrete_score_fn(exact_discrete_model(gm, given), sde, claimed)(x, t)
        assert (wrong - exact).abs().max() > 1e-2, (given, claimed)


def test_discrete_timestep_map_rounds_and_clamps():
    """``n = round(N t - 1)`` clamped into ``0 .. N-1``; the score uses that timestep's alpha and sigma."""
    gm, sde = _mixture(), _sde()
    cases = [  # (t, the timestep the model must see)
        (1.0 / N, 0), (18.0 / N, 17), (1.0, N - 1),  # knots
        ((18.0 + 0.3) / N, 17), ((18.0 - 0.3) / N, 17),  # off-knot: nearest knot
        ((18.0 + 0.49) / N, 17), ((18.0 + 0.51) / N, 18), ((18.0 - 0.51) / N, 16),
        (1e-5, 0), (0.4 / N, 0), (0.6 / N, 0), (1.4 / N, 0), (1.6 / N, 1),  # close to 0: clamped to 0
        (1.0 - 0.3 / N, N - 1),
    ]
    t = torch.tensor([c[0] for c in cases], dtype=F64)
    expected = torch.tensor([c[1] for c in cases])
    x = _inputs(len(cases))
    calls = []
    score = discrete_score_fn(exact_discrete_model(gm, "eps", calls), sde, "eps")(x, t)
    assert len(calls) == 1
    assert calls[0].dtype == torch.long and calls[0].shape == (len(cases),)
    assert torch.equal(calls[0], expected), (calls[0], expected)
    # the score is the mixture's at the knot of the rounded timestep, not at t
    knot = gm.marginal_score(sde, x, (expected.to(F64) + 1.0) / N)
    torch.testing.assert_close(score, knot, rtol=1e-10, atol=1e-10 * knot.abs().max().item())
    off = (t - (expected.to(F64) + 1.0) / N).abs() > 0.2 / N
    assert (score - gm.marginal_score(sde, x, t))[off].abs().max() > 1e-4  # the knot is not t itself


def test_discrete_float_timesteps_use_exact_alpha_sigma():
    """``integer_timesteps=False``: the model gets float ``n = N t - 1`` and the score uses alpha(t), sigma(t)."""
    gm, sde = _mixture(), _sde()
    t = torch.tensor([1e-3, 0.4 / N, 18.3 / N, 0.5, 0.777, 1.0], dtype=F64)
    x = _inputs(len(t))
    calls = []

    def float_model(x, n):  # the mixture's eps at the SDE's alpha, sigma at time (n + 1) / N
        calls.append(n.clone())
        alpha, sigma = sde.marginal((n.to(F64) + 1.0) / N)
        return _predict(gm, x, alpha, sigma, "eps")

    score = discrete_score_fn(float_model, sde, "eps", integer_timesteps=False)(x, t)
    assert len(calls) == 1 and calls[0].is_floating_point()
    torch.testing.assert_close(calls[0], N * t - 1.0, rtol=0.0, atol=1e-12)
    exact = gm.marginal_score(sde, x, t)
    torch.testing.assert_close(score, exact, rtol=1e-10, atol=1e-10 * exact.abs().max().item())


def test_discrete_score_fn_errors():
    gm = _mixture()
    model = exact_discrete_model(gm, "eps")
    for continuous in (VPSDE(), VPSDE(schedule="cosine"), VESDE()):
        with pytest.raises(TypeError, match="from_betas"):
            discrete_score_fn(model, continuous, "eps")
    with pytest.raises(ValueError, match="prediction"):
        discrete_score_fn(model, _sde(), "noise")
    with pytest.raises(ValueError, match="prediction"):
        discrete_score_fn(model, _sde(), "epsilon")  # diffusers' name is not sdediff's


# --------------------------------------------------------------------------------------------
# diffusers: a tiny randomly initialized UNet2DModel and its scheduler

C, H = 2, 8  # channels, height = width


def _diffusers():
    return pytest.importorskip("diffusers")


def _tiny_unet(out_channels=C, seed=0):
    diffusers = _diffusers()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = diffusers.UNet2DModel(
            sample_size=H, in_channels=C, out_channels=out_channels, layers_per_block=1,
            block_out_channels=(8, 16), norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        )
    return unet.double().eval()


def _scheduler(cls="DDPMScheduler", **config):
    diffusers = _diffusers()
    config = dict(num_train_timesteps=N, beta_start=0.1 / N, beta_end=20.0 / N) | config
    return getattr(diffusers, cls)(**config)


def _images(batch=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, C, H, H, generator=g, dtype=F64)


# Knot times and off-knot times of known timesteps, one per batch element.
_TIMES = [(1.0 / N, 0), ((24.0 + 0.3) / N, 23), (1.0, N - 1)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_from_diffusers_score_matches_unet_output(prediction_type):
    unet = _tiny_unet()
    scheduler = _scheduler(prediction_type=prediction_type)
    score_fn, sde = from_diffusers(unet, scheduler)
    x = _images(len(_TIMES))
    t = torch.tensor([c[0] for c in _TIMES], dtype=F64)
    n = torch.tensor([c[1] for c in _TIMES])
    # the SDE carries the scheduler's schedule: alpha((n + 1) / N)^2 = alphas_cumprod[n]
    abar = scheduler.alphas_cumprod.double()
    knots = (torch.arange(N, dtype=F64) + 1.0) / N
    torch.testing.assert_close(sde.marginal(knots)[0] ** 2, abar, rtol=1e-13, atol=0.0)
    with torch.no_grad():
        score = score_fn(x, t)
        out = unet(x, n).sample
    assert out.abs().mean() > 1e-2  # the random UNet's output is not trivially zero
    alpha, sigma = _bc(abar[n].sqrt(), x), _bc((1.0 - abar[n]).sqrt(), x)
    if prediction_type == "epsilon":
        expected = -out / sigma
    elif prediction_type == "sample":
        expected = (alpha * out - x) / sigma**2
    else:  # v = alpha eps - sigma x0, x = alpha x0 + sigma eps  =>  eps = sigma x + alpha v
        expected = -(sigma * x + alpha * out) / sigma
    torch.testing.assert_close(score, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())


def test_from_diffusers_learned_variance_keeps_first_channels():
    unet = _tiny_unet(out_channels=2 * C)
    scheduler = _scheduler(variance_type="learned_range")
    score_fn, sde = from_diffusers(unet, scheduler)
    x = _images(len(_TIMES))
    t = torch.tensor([c[0] for c in _TIMES], dtype=F64)
    n = torch.tensor([c[1] for c in _TIMES])
    with torch.no_grad():
        score = score_fn(x, t)
        out = unet(x, n).sample
    assert out.shape == (len(_TIMES), 2 * C, H, H) and score.shape == x.shape
    sigma = _bc((1.0 - scheduler.alphas_cumprod.double()[n]).sqrt(), x)
    expected = -out[:, :C] / sigma
    torch.testing.assert_close(score, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())
    assert (out[:, C:] - out[:, :C]).abs().max() > 1e-2  # the other half would give another score
    # learned_range is improved DDPM's interpolation: the score_fn carries it for sample_ddpm
    assert isinstance(score_fn, LearnedVariance)
    with torch.no_grad():
        frac = score_fn.interpolation(x, t)
    torch.testing.assert_close(frac, (out[:, C:].double() + 1.0) / 2.0, rtol=0.0, atol=1e-12)
    other, _ = from_diffusers(unet, _scheduler(variance_type="fixed_small"))
    assert not isinstance(other, LearnedVariance)
    with torch.no_grad():
        torch.testing.assert_close(other(x, t), expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())
        sample = sample_ddpm(score_fn, sde, x, steps=4, generator=torch.Generator().manual_seed(0)).x
    assert sample.shape == x.shape and bool(torch.isfinite(sample).all())


def test_from_diffusers_rejects_unknown_prediction_type():
    scheduler = _scheduler()
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(_tiny_unet(), scheduler)
    with pytest.raises(TypeError, match="scheduler"):
        from_diffusers(_tiny_unet(), object())


def _float64_scheduler(scheduler):
    """The same scheduler with its float32 ``alphas_cumprod`` upcast (same numbers, float64 arithmetic)."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.one = torch.tensor(1.0, dtype=F64)
    return scheduler


@pytest.mark.parametrize("prediction_type,steps,float64", [
    ("epsilon", N, True), ("epsilon", 10, False), ("sample", 10, False), ("v_prediction", 10, False),
])
def test_sample_ddpm_with_tiny_unet_matches_diffusers_loop(prediction_type, steps, float64):
    """sdediff's DDPM on the adapted UNet = diffusers' DDPMScheduler loop, same x and identically seeded noise.

    sample_ddpm's defaults (variance "beta", no clipping) are diffusers' "fixed_large",
    clip_sample=False. The random UNet is no denoiser: with eps-prediction the states grow to
    ~1e3 (x0 = (x - sigma eps) / alpha with alpha down to 2e-3), so the differences are measured
    relative to the state's scale ``max(1, max |x|)``.

    * float64 scheduler (its float32 ``alphas_cumprod`` upcast; all 50 steps): float64 round-off,
      measured 1.4e-12 at scale 1.4e3 (1e-15 relative); bound 1e-12 relative.
    * stock scheduler (float32 coefficients; 10 steps): float32 round-off of diffusers'
      coefficients, measured 4.7e-8 relative (eps), 5e-8 (sample) and 5e-8 (v, 1.7e-7 at scale
      3.1); bound 3e-5 relative, the float32 cancellation in ``1 - alphas_cumprod[0] = beta_0 =
      2e-3`` (2^-24 / beta_0, as in test_diffusers_conformance).
    """
    unet = _tiny_unet()
    scheduler = _scheduler(variance_type="fixed_large", clip_sample=False, prediction_type=prediction_type)
    if float64:
        _float64_scheduler(scheduler)
    if steps != N:
        scheduler.set_timesteps(steps)
    score_fn, sde = from_diffusers(unet, scheduler)
    x_init = _images(2, seed=3)
    with torch.no_grad():
        g1 = torch.Generator().manual_seed(7)
        ours = sample_ddpm(score_fn, sde, x_init.clone(), steps=steps, generator=g1)
        g2 = torch.Generator().manual_seed(7)
        x = x_init.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=g2).prev_sample
        other = sample_ddpm(score_fn, sde, x_init.clone(), steps=steps, generator=torch.Generator().manual_seed(8))
    assert ours.nfe == steps and len(scheduler.timesteps) == steps
    scale = max(1.0, x.abs().max().item())
    diff = (ours.x - x).abs().max().item()
    print(f"\nsample_ddpm vs diffusers, tiny UNet, {prediction_type}, steps={steps}, float64 scheduler={float64}: "
          f"max |diff| = {diff:.2e} at scale {scale:.2e}")
    assert diff < (1e-12 if float64 else 3e-5) * scale
    # the noise is not negligible: a differently seeded run lands elsewhere
    assert (other.x - x).abs().max() > 1e-2 * scale
