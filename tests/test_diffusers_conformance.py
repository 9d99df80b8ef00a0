"""Conformance with diffusers: sdediff's DDPM and DDIM steps are DDPMScheduler.step and DDIMScheduler.step.

With the same eps-model (an analytic one: the exact eps of a Gaussian mixture at the scheduler's
``alphas_cumprod[n]``, no network), the same timesteps and the same noise, sdediff's solver steps
and samplers reproduce diffusers' scheduler steps and sampling loops.

* sdediff runs on ``VPSDE.from_alphas_cumprod(scheduler.alphas_cumprod.double())`` with the model
  through :func:`sdediff.discrete_score_fn`; timestep ``n`` sits at ``t = (n + 1) / N``, and
  diffusers' "previous timestep" ``-1`` is ``t = 0`` (``alphas_cumprod = 1``, set_alpha_to_one).
* Noise: diffusers draws ``randn(shape, generator, dtype=float64)`` once per step (DDPM: when
  ``t > 0``; DDIM: when ``eta > 0``); sdediff's loop draws the same from an identically seeded
  generator as ``dW = z sqrt(|h|)``, and none at its last step. Single steps reproduce diffusers'
  draw by cloning the generator's state.
* Precision: states are float64. diffusers keeps ``alphas_cumprod`` in float32 and evaluates its
  coefficients there; with the scheduler's ``alphas_cumprod`` upcast to float64 (the same numbers,
  diffusers' own code) every step and loop agrees to float64 round-off (measured <= 1e-14, once
  2e-13):
  that is the issue's "to 1e-6 (float64)", asserted with the bound ``TOL_F64 = 1e-9``, which
  also covers diffusers' variance floor ("fixed_small" clamps the variance at 1e-20, i.e. adds
  1e-10 z at a final step from a timestep > 0, where the exact variance is 0: measured 2.3e-10
  for DDPM "trailing" fixed_small steps). Against the stock
  float32 schedulers the agreement is float32 round-off: ``1 - alphas_cumprod`` and
  ``1 - abar_t / abar_prev`` cancel near t = 0, with relative error up to ``2^-24 / beta_0 =
  3e-5`` for ``beta_0 = 2e-3``; on O(1) states that is the bound ``TOL_F32 = 3e-5`` (measured:
  DDIM steps <= 4e-7 and loops <= 4e-6; DDPM steps and loops on 10 timesteps <= 2e-6 and over all
  50 timesteps up to 4e-6, at n = 1 and 2, where ``1 - abar`` ~ 1e-2).

Run with ``-s`` to see the measured differences.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sdediff import (  # noqa: E402
    GaussianMixture, ReverseProcess, VPSDE, discrete_score_fn, discrete_time_grid, sample_ddim, sample_ddpm,
)
from sdediff.solvers import DDIM, Ancestral  # noqa: E402

F64 = torch.float64
N = 50  # training timesteps, small so that every test here runs in well under a second
STEPS = 10  # fewer inference steps; N is divisible by it (diffusers' DDIM needs a regular spacing)
SCHEDULE = dict(num_train_timesteps=N, beta_start=0.1 / N, beta_end=20.0 / N)  # DDPM's linear betas, N steps
TOL_F32, TOL_F64 = 3e-5, 1e-9  # stock (float32) and upcast (float64) schedulers: see the module docstring
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}

# Data beyond [-1, 1], so that clipping the predicted x0 at 1 is active.
GM = GaussianMixture([0.4, 0.6], torch.tensor([[2.0, -1.5, 0.5, 1.2], [-2.0, 1.0, 1.5, -0.8]]), 0.3)
ABAR = diffusers.DDPMScheduler(**SCHEDULE).alphas_cumprod.double()  # (DDIMScheduler's are the same)
SDE = VPSDE.from_alphas_cumprod(ABAR)


def model(prediction_type="epsilon"):
    """``model(x, n)`` (``n``: 0-d or ``(batch,)`` integer): the mixture's exact eps / x0 / v at ``alphas_cumprod[n]``."""

    def fn(x, n):
        n = torch.as_tensor(n).long().expand(x.shape[0])
        abar = ABAR[n].reshape(-1, 1)
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        eps = -sigma * GM.marginal_score(SDE, x, (n.to(F64) + 1.0) / N)
        x0 = (x - sigma * eps) / alpha
        return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[prediction_type]

    return fn


def score_fn(prediction_type="epsilon"):
    return discrete_score_fn(model(prediction_type), SDE, PREDICTIONS[prediction_type])


def _x_init(batch=8, seed=0):
    return torch.randn(batch, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _time(n):
    """sdediff's time of diffusers' timestep ``n`` (``-1``, or any negative: the data, t = 0)."""
    return torch.tensor((int(n) + 1) / N if n >= 0 else 0.0, dtype=F64)


def _noise_like(x, generator):
    """The draw diffusers' next ``randn_tensor(x.shape, generator, dtype=x.dtype)`` will make, without consuming it."""
    clone = torch.Generator().set_state(generator.get_state())
    return torch.randn(x.shape, generator=clone, dtype=x.dtype)


def _upcast(scheduler):
    """The same scheduler computing in float64: its float32 ``alphas_cumprod`` (and the final 1) upcast."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    if hasattr(scheduler, "one"):
        scheduler.one = torch.tensor(1.0, dtype=F64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return scheduler


def _report(name, **diffs):
    print(f"\n{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def _maxdiff(a, b):
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------
# the grids


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [STEPS, 7, N])
def test_discrete_time_grid_is_diffusers_timesteps(cls, spacing, steps):
    """sdediff's grid of ``steps`` timesteps is diffusers' ``scheduler.timesteps`` (steps_offset 0), then t = 0."""
    scheduler = getattr(diffusers, cls)(**SCHEDULE, timestep_spacing=spacing, steps_offset=0)
    scheduler.set_timesteps(steps)
    ts = discrete_time_grid(SDE, steps, spacing=spacing)
    assert ts[-1] == 0.0
    assert torch.equal(torch.round(ts[:-1] * N - 1).long(), scheduler.timesteps)
    torch.testing.assert_close(ts[:-1], (scheduler.timesteps.to(F64) + 1.0) / N, rtol=0.0, atol=1e-15)


# --------------------------------------------------------------------------------------------
# DDPM

DDPM_VARIANCES = {"fixed_small": "posterior", "fixed_large": "beta"}
# (num_inference_steps, timestep_spacing): None = diffusers' default, all N timesteps without set_timesteps
DDPM_TIMESTEPS = [(None, "leading"), (N, "leading"), (STEPS, "leading"), (STEPS, "trailing"), (STEPS, "linspace")]


def _ddpm_scheduler(variance_type, clip, steps, spacing, prediction_type="epsilon", float64=False):
    scheduler = diffusers.DDPMScheduler(**SCHEDULE, variance_type=variance_type, clip_sample=clip, clip_sample_range=1.0,
                                        prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=0)
    if steps is not None:
        scheduler.set_timesteps(steps)
    return _upcast(scheduler) if float64 else scheduler


def _ddpm_step_diff(variance_type, clip, steps, spacing, prediction_type, float64):
    """Max over diffusers' chain of |sdediff's Ancestral step - DDPMScheduler.step|, from the same state and noise."""
    scheduler = _ddpm_scheduler(variance_type, clip, steps, spacing, prediction_type, float64)
    eps_model, term = model(prediction_type), ReverseProcess(SDE, score_fn(prediction_type), 1.0).sde_term()
    solver = Ancestral(DDPM_VARIANCES[variance_type], 1.0 if clip else None, eps_from_clipped_x0=True)
    g = torch.Generator().manual_seed(1)
    x, worst = _x_init(), 0.0
    for n in scheduler.timesteps:
        t, s = _time(n), _time(scheduler.previous_timestep(n))
        z = _noise_like(x, g)
        out = scheduler.step(eps_model(x, n), n, x, generator=g).prev_sample
        dw = z * (t - s).abs().sqrt() if n > 0 else None  # diffusers draws noise when n > 0
        worst = max(worst, _maxdiff(solver.step(term, x, t, s, dw), out))
        x = out
    return worst


@pytest.mark.parametrize("steps,spacing", DDPM_TIMESTEPS)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance_type", list(DDPM_VARIANCES))
def test_ddpm_step_matches_diffusers(variance_type, clip, steps, spacing):
    """One Ancestral step (variance "posterior" <-> fixed_small, "beta" <-> fixed_large) = one DDPMScheduler.step."""
    stock = _ddpm_step_diff(variance_type, clip, steps, spacing, "epsilon", float64=False)
    upcast = _ddpm_step_diff(variance_type, clip, steps, spacing, "epsilon", float64=True)
    _report(f"DDPM step {variance_type} clip={clip} steps={steps} {spacing}", float32_scheduler=stock,
            float64_scheduler=upcast)
    assert stock < TOL_F32
    assert upcast < TOL_F64


def _ddpm_loop(variance_type, clip, steps, spacing, prediction_type="epsilon", float64=False, seed=3):
    """diffusers' loop: the states after each step and the last step's (noise-free) predicted x0."""
    scheduler = _ddpm_scheduler(variance_type, clip, steps, spacing, prediction_type, float64)
    eps_model, g = model(prediction_type), torch.Generator().manual_seed(seed)
    x = _x_init()
    xs = [x]
    for n in scheduler.timesteps:
        out = scheduler.step(eps_model(x, n), n, x, generator=g)
        x = out.prev_sample
        xs.append(x)
    return torch.stack(xs), out.pred_original_sample, scheduler.timesteps


def _sdediff_ddpm(variance_type, clip, steps, spacing, prediction_type="epsilon", seed=3):
    return sample_ddpm(score_fn(prediction_type), SDE, _x_init(), steps=steps, variance=DDPM_VARIANCES[variance_type],
                       clip_x0=1.0 if clip else None, spacing=spacing, generator=torch.Generator().manual_seed(seed),
                       return_trajectory=True)


@pytest.mark.parametrize("steps,spacing", DDPM_TIMESTEPS)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance_type", list(DDPM_VARIANCES))
def test_sample_ddpm_matches_diffusers_loop(variance_type, clip, steps, spacing):
    """sample_ddpm = diffusers' DDPM loop: the same states after every step, from one seed.

    The final state is compared with diffusers' last predicted x0: sdediff's last step (to t = 0)
    adds no noise, as Ho et al.'s sampler; diffusers adds none either when its last timestep is 0
    (checked), but it does for a "trailing" grid, whose last timestep is N/steps - 1 > 0 (see
    test_ddpm_trailing_last_step_noise).
    """
    sol = _sdediff_ddpm(variance_type, clip, steps, spacing)
    diffs = {}
    for float64 in (False, True):
        xs, x0_last, timesteps = _ddpm_loop(variance_type, clip, steps, spacing, float64=float64)
        assert len(sol.ts) == len(xs) and sol.nfe == len(timesteps)
        d = max(_maxdiff(sol.xs[:-1], xs[:-1]), _maxdiff(sol.x, x0_last))
        if timesteps[-1] == 0:
            d = max(d, _maxdiff(sol.x, xs[-1]))
        diffs["float64_scheduler" if float64 else "float32_scheduler"] = d
    _report(f"DDPM loop {variance_type} clip={clip} steps={steps} {spacing}", **diffs)
    assert diffs["float32_scheduler"] < TOL_F32
    assert diffs["float64_scheduler"] < TOL_F64
    if clip:  # the clipping is active: without it the samples differ
        assert _maxdiff(_sdediff_ddpm(variance_type, False, steps, spacing).x, sol.x) > 1e-2


def test_ddpm_trailing_last_step_noise():
    """diffusers adds noise at its final step when that timestep is > 0 ("trailing"); sdediff does not.

    With fixed_large, DDPMScheduler.step from timestep n_last = 4 to -1 returns its predicted x0 plus
    ``sqrt(beta) z`` with ``beta = 1 - alphas_cumprod[4]``; sdediff's DDPM, like Ho et al.'s, ends
    on the mean (the predicted x0). Everything before the last step agrees (test above). A
    convention, not an error of either: Ho et al.'s Algorithm 2 sets z = 0 at the final step.
    """
    xs, x0_last, timesteps = _ddpm_loop("fixed_large", False, STEPS, "trailing", float64=True, seed=3)
    assert int(timesteps[-1]) == N // STEPS - 1
    # every timestep is > 0, so diffusers drew STEPS times; the last draw went to the final state
    g = torch.Generator().manual_seed(3)
    z = [torch.randn(xs[0].shape, generator=g, dtype=F64) for _ in range(STEPS)][-1]
    beta = 1.0 - ABAR[timesteps[-1]]
    torch.testing.assert_close(xs[-1] - x0_last, beta.sqrt() * z, rtol=0.0, atol=TOL_F64)
    assert beta.sqrt() > 0.1  # not negligible: 1 - alphas_cumprod[4] = 0.088
    assert _maxdiff(_sdediff_ddpm("fixed_large", False, STEPS, "trailing").x, x0_last) < TOL_F64


# --------------------------------------------------------------------------------------------
# DDIM

# (timestep_spacing, num_inference_steps) of the steps; with steps = N every spacing lists all timesteps 0 .. N-1
DDIM_TIMESTEPS = [("leading", STEPS), ("trailing", STEPS), ("linspace", STEPS), ("linspace", N)]
# the loops: not linspace with steps < N, where diffusers' own chain is inconsistent
# (test_ddim_linspace_prev_timestep_is_not_the_next_listed); its steps are compared above
DDIM_LOOP_TIMESTEPS = [c for c in DDIM_TIMESTEPS if c != ("linspace", STEPS)]
CLIPS = [(False, False), (True, False), (True, True)]  # (clip_sample, use_clipped_model_output)


def _ddim_scheduler(spacing, steps, clip, prediction_type="epsilon", float64=False):
    scheduler = diffusers.DDIMScheduler(**SCHEDULE, clip_sample=clip, clip_sample_range=1.0, set_alpha_to_one=True,
                                        steps_offset=0, timestep_spacing=spacing, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    return _upcast(scheduler) if float64 else scheduler


def _ddim_solver(eta, clip, use_clipped):
    """sdediff's step for DDIM's eta: the "ddim" ODE step (eta = 0) or the "ancestral" SDE step with stochasticity eta."""
    clip_x0 = 1.0 if clip else None
    return DDIM(clip_x0, use_clipped) if eta == 0 else Ancestral("posterior", clip_x0, use_clipped)


def _ddim_step_diff(eta, clip, use_clipped, spacing, steps, prediction_type, float64):
    """Max over diffusers' chain of |sdediff's step - DDIMScheduler.step|, to diffusers' prev timestep t - N // steps."""
    scheduler = _ddim_scheduler(spacing, steps, clip, prediction_type, float64)
    eps_model, solver = model(prediction_type), _ddim_solver(eta, clip, use_clipped)
    process = ReverseProcess(SDE, score_fn(prediction_type), eta)
    g = torch.Generator().manual_seed(1)
    x, worst = _x_init(), 0.0
    for n in scheduler.timesteps:
        t, s = _time(n), _time(n - N // steps)  # DDIMScheduler.step's previous timestep
        z = _noise_like(x, g)
        out = scheduler.step(eps_model(x, n), n, x, eta=eta, use_clipped_model_output=use_clipped,
                             generator=g).prev_sample
        ours = (solver.step(process.ode_term(), x, t, s) if eta == 0
                else solver.step(process.sde_term(), x, t, s, z * (t - s).abs().sqrt()))
        worst = max(worst, _maxdiff(ours, out))
        x = out
    return worst


@pytest.mark.parametrize("spacing,steps", DDIM_TIMESTEPS)
@pytest.mark.parametrize("clip,use_clipped", CLIPS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(eta, clip, use_clipped, spacing, steps):
    """One DDIM step (eta 0: ODE step; eta > 0: ancestral with stochasticity eta) = one DDIMScheduler.step.

    clip_sample <-> clip_x0=1.0, use_clipped_model_output <-> eps_from_clipped_x0. The step goes
    to diffusers' previous timestep ``n - N // steps`` (for "linspace" with steps < N, not the
    next listed timestep: see test_ddim_linspace_prev_timestep_is_not_the_next_listed).
    """
    stock = _ddim_step_diff(eta, clip, use_clipped, spacing, steps, "epsilon", float64=False)
    upcast = _ddim_step_diff(eta, clip, use_clipped, spacing, steps, "epsilon", float64=True)
    _report(f"DDIM step eta={eta} clip={clip} clipped_eps={use_clipped} {spacing} steps={steps}",
            float32_scheduler=stock, float64_scheduler=upcast)
    assert stock < TOL_F32
    assert upcast < TOL_F64


def _ddim_loop(eta, clip, use_clipped, spacing, steps, prediction_type="epsilon", float64=False, seed=3):
    scheduler = _ddim_scheduler(spacing, steps, clip, prediction_type, float64)
    eps_model, g = model(prediction_type), torch.Generator().manual_seed(seed)
    x = _x_init()
    xs = [x]
    for n in scheduler.timesteps:
        x = scheduler.step(eps_model(x, n), n, x, eta=eta, use_clipped_model_output=use_clipped,
                           generator=g).prev_sample
        xs.append(x)
    return torch.stack(xs)


def _sdediff_ddim(eta, clip, use_clipped, spacing, steps, prediction_type="epsilon", seed=3):
    return sample_ddim(score_fn(prediction_type), SDE, _x_init(), steps=steps, eta=eta, spacing=spacing,
                       clip_x0=1.0 if clip else None, eps_from_clipped_x0=use_clipped,
                       generator=torch.Generator().manual_seed(seed), return_trajectory=True)


@pytest.mark.parametrize("spacing,steps", DDIM_LOOP_TIMESTEPS)
@pytest.mark.parametrize("clip,use_clipped", CLIPS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_sample_ddim_matches_diffusers_loop(eta, clip, use_clipped, spacing, steps):
    """sample_ddim = diffusers' DDIM loop (same states after every step, one seed), where diffusers' chain is consistent."""
    sol = _sdediff_ddim(eta, clip, use_clipped, spacing, steps)
    diffs = {}
    for float64 in (False, True):
        xs = _ddim_loop(eta, clip, use_clipped, spacing, steps, float64=float64)
        assert sol.xs.shape == xs.shape and sol.nfe == steps
        diffs["float64_scheduler" if float64 else "float32_scheduler"] = _maxdiff(sol.xs, xs)
    _report(f"DDIM loop eta={eta} clip={clip} clipped_eps={use_clipped} {spacing} steps={steps}", **diffs)
    assert diffs["float32_scheduler"] < TOL_F32
    assert diffs["float64_scheduler"] < TOL_F64
    if clip:  # the clipping is active: without it the samples differ
        assert _maxdiff(_sdediff_ddim(eta, False, False, spacing, steps).x, sol.x) > 1e-2
    if eta > 0:  # and so is the noise
        assert _maxdiff(_sdediff_ddim(eta, clip, use_clipped, spacing, steps, seed=4).x, sol.x) > 1e-2


def test_ddim_linspace_prev_timestep_is_not_the_next_listed():
    """Why the "linspace" loops with steps < N are not compared: diffusers' DDIM chain is not a DDIM chain there.

    DDIMScheduler.step moves the state to ``n - N // steps`` while the next model call is at the
    next listed timestep; for linspace(0, N-1, 10).round() = 0, 5, 11, 16, 22, 27, 33, 38, 44, 49
    the gaps are 5 or 6 and N // 10 = 5, so the state and the timestep drift apart. sdediff's grid
    is the listed timesteps (test_discrete_time_grid_is_diffusers_timesteps) and steps between them.
    """
    scheduler = _ddim_scheduler("linspace", STEPS, False)
    listed = scheduler.timesteps
    prev = listed - N // STEPS
    assert not torch.equal(prev[:-1], listed[1:])
    assert set((listed[:-1] - listed[1:]).tolist()) == {5, 6}
    # consequently the two loops part ways by far more than round-off (measured 8e-2)
    sol = _sdediff_ddim(0.0, False, False, "linspace", STEPS)
    assert _maxdiff(sol.x, _ddim_loop(0.0, False, False, "linspace", STEPS, float64=True)[-1]) > 1e-3


# --------------------------------------------------------------------------------------------
# other parameterizations: the same model as x0- or v-prediction, through discrete_score_fn


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
def test_predictions_match_diffusers(prediction_type, clip):
    """DDPM (fixed_small, all steps) and DDIM (eta 0 and 1, trailing) with x0- and v-prediction models."""
    diffs = {}
    for float64 in (False, True):
        key = "float64" if float64 else "float32"
        diffs[f"ddpm_step_{key}"] = _ddpm_step_diff("fixed_small", clip, None, "leading", prediction_type, float64)
        xs, x0_last, _ = _ddpm_loop("fixed_small", clip, None, "leading", prediction_type, float64)
        sol = _sdediff_ddpm("fixed_small", clip, None, "leading", prediction_type)
        diffs[f"ddpm_loop_{key}"] = max(_maxdiff(sol.xs, xs), _maxdiff(sol.x, x0_last))
        for eta in (0.0, 1.0):
            diffs[f"ddim{eta:g}_step_{key}"] = _ddim_step_diff(eta, clip, clip, "trailing", STEPS, prediction_type,
                                                               float64)
            xs = _ddim_loop(eta, clip, clip, "trailing", STEPS, prediction_type, float64)
            diffs[f"ddim{eta:g}_loop_{key}"] = _maxdiff(_sdediff_ddim(eta, clip, clip, "trailing", STEPS,
                                                                      prediction_type).xs, xs)
    _report(f"{prediction_type} clip={clip}", **diffs)
    for name, d in diffs.items():
        assert d < (TOL_F64 if name.endswith("float64") else TOL_F32), name


# --------------------------------------------------------------------------------------------
# improved DDPM's learned variance


def learned_variance_model(x, n):
    """``(batch, 2C)``: the exact eps, then a variance output ``v in (-1, 1)`` varying with ``x`` and ``n``."""
    n = torch.as_tensor(n).long().expand(x.shape[0])
    v = torch.tanh(0.7 * x + 0.03 * n.to(F64)[:, None] - 0.5)
    return torch.cat([model()(x, n), v], 1)


@pytest.mark.parametrize("steps,spacing", [(None, "leading"), (STEPS, "leading"), (STEPS, "trailing")])
def test_learned_variance_ddpm_matches_diffusers_learned_range(steps, spacing):
    """sample_ddpm with a LearnedVariance network = DDPMScheduler(variance_type="learned_range"), step by step."""
    from sdediff import LearnedVariance

    scheduler = _upcast(diffusers.DDPMScheduler(**SCHEDULE, variance_type="learned_range", clip_sample=False,
                                                timestep_spacing=spacing, steps_offset=0))
    if steps is not None:
        scheduler.set_timesteps(steps)
    g, x = torch.Generator().manual_seed(5), _x_init()
    xs = [x]
    for n in scheduler.timesteps:
        x = scheduler.step(learned_variance_model(x, n), n, x, generator=g).prev_sample
        xs.append(x)
    lv = LearnedVariance(learned_variance_model, SDE)
    sol = sample_ddpm(lv, SDE, _x_init(), steps=steps, spacing=spacing, generator=torch.Generator().manual_seed(5),
                      return_trajectory=True)
    n_last = int(scheduler.timesteps[-1])
    compared = torch.stack(xs) if n_last == 0 else torch.stack(xs)[:-1]
    diff = _maxdiff(sol.xs[: len(compared)], compared)
    _report(f"learned-variance DDPM steps={steps} {spacing}", float64_scheduler=diff)
    assert diff < TOL_F64 and sol.nfe == len(scheduler.timesteps)
    # The variance matters: the fixed "beta" and "posterior" variances give other samples.
    for fixed in ("beta", "posterior"):
        other = sample_ddpm(lv, SDE, _x_init(), steps=steps, spacing=spacing, variance=fixed,
                            generator=torch.Generator().manual_seed(5))
        assert _maxdiff(other.x, sol.x) > 1e-3
