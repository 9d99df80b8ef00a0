"""The sampling API: samples reproduce the target distribution, NFE and trajectories, reproducibility."""

import pytest
import torch

import sdediff as sd

from mixture_checks import assert_matches_mixture

# Three well-separated modes (>= 5 component stds apart), so assigning samples to their most
# likely component misclassifies a negligible fraction and per-mode statistics are clean.
MIXTURE = sd.GaussianMixture([0.2, 0.5, 0.3], [[-3.0, 0.0], [0.0, 2.5], [3.0, -1.0]], [0.4, 0.6, 0.5])
T_END = 1e-3
Z = 4.0  # tolerance in standard errors: a false alarm about once in 16,000 checks


def assert_matches(x, target):
    assert_matches_mixture(x, target, Z)


SDES = [sd.VPSDE(), sd.VPSDE(schedule="cosine"), sd.SubVPSDE(), sd.VESDE(sigma_max=20.0)]


def exact_start(sde, seed, n=4000):
    """Exact draws from p_T. (The prior N(0, sigma_max^2) of a VE SDE with sigma_max = 20 is off
    from p_T by a mean shift of 0.05 std, which moves this mixture's mode weights by ~0.02, i.e.
    2.5 standard errors; starting from p_T leaves only the solver's error.)"""
    return MIXTURE.diffused(sde, sde.T).sample(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_probability_flow_samples_match_the_mixture(sde):
    # Heun with 100 steps is ~1e-3 from the exact flow here, far below the sampling error (~1e-2).
    sol = sd.sample_ode(MIXTURE.score_fn(sde), sde, exact_start(sde, 0), steps=100, solver="heun", t_end=T_END,
                        grid="log_snr")
    assert_matches(sol.x, MIXTURE.diffused(sde, T_END))


@pytest.mark.parametrize("stochasticity", [1.0, 0.5])
@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_reverse_sde_samples_match_the_mixture(sde, stochasticity):
    # Euler-Maruyama's weak error at 500 steps is O(1e-3), below the sampling error of 4000 draws.
    sol = sd.sample_sde(MIXTURE.score_fn(sde), sde, exact_start(sde, 1), steps=500, stochasticity=stochasticity,
                        t_end=T_END, generator=torch.Generator().manual_seed(1), noise_free_last_step=False)
    assert_matches(sol.x, MIXTURE.diffused(sde, T_END))


def test_prior_start_matches_the_mixture_for_vp():
    """From the prior itself (VP: p_T is N(0, I) up to alpha(T) = 7e-3), as a user samples."""
    sde = sd.VPSDE()
    sol = sd.sample_ode(MIXTURE.score_fn(sde), sde, (4000, 2), steps=50, solver="rk4", t_end=T_END,
                        generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_matches(sol.x, MIXTURE.diffused(sde, T_END))


def test_the_distribution_checks_can_fail():
    """The same checks reject samples of a slightly wrong distribution (a 15% too wide mode, shifted weights)."""
    wrong = sd.GaussianMixture([0.25, 0.45, 0.3], MIXTURE.means, MIXTURE.stds * torch.tensor([[1.0], [1.15], [1.0]]))
    x = wrong.sample(4000, generator=torch.Generator().manual_seed(2))
    with pytest.raises(AssertionError):
        assert_matches(x, MIXTURE)
    assert_matches(MIXTURE.sample(4000, generator=torch.Generator().manual_seed(2)), MIXTURE)


def test_too_few_steps_are_caught_by_the_distribution_check():
    """Euler-Maruyama with 10 steps is visibly biased: the test bed resolves solver error."""
    sde = sd.VPSDE()
    sol = sd.sample_sde(MIXTURE.score_fn(sde), sde, (4000, 2), steps=10, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64, t_end=T_END)
    with pytest.raises(AssertionError):
        assert_matches(sol.x, MIXTURE.diffused(sde, T_END))


@pytest.mark.parametrize("solver, per_step", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_nfe_and_trajectory(solver, per_step):
    sde = sd.VPSDE()
    x = sde.prior_sample((8, 2), generator=torch.Generator().manual_seed(0))
    sol = sd.sample_ode(MIXTURE.score_fn(sde), sde, x, steps=7, solver=solver, return_trajectory=True)
    assert sol.nfe == 7 * per_step
    assert sol.ts.shape == (8,) and sol.ts[0] == sde.T and sol.ts[-1] == pytest.approx(1e-3)
    assert bool((sol.ts[1:] < sol.ts[:-1]).all())
    assert sol.xs.shape == (8, 8, 2) and torch.equal(sol.xs[0], x) and torch.equal(sol.xs[-1], sol.x)
    assert sd.sample_ode(MIXTURE.score_fn(sde), sde, x, steps=7, solver=solver).xs is None


def test_adaptive_nfe_is_counted_and_trajectory_follows_the_grid():
    sde = sd.VPSDE()
    calls = []

    def score_fn(x, t):
        calls.append(t)
        return MIXTURE.score_fn(sde)(x, t)

    x = sde.prior_sample((8, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sol = sd.sample_ode(score_fn, sde, x, solver="dopri5", steps=5, return_trajectory=True)
    assert sol.nfe == len(calls) > 10
    assert sol.xs.shape == (6, 8, 2)
    assert all(t.shape == (8,) and 1e-3 <= t.min() and t.max() <= sde.T for t in calls)  # never beyond t_end
    exact_end = sd.sample_ode(MIXTURE.score_fn(sde), sde, x, solver="dopri5").x
    assert (sol.x - exact_end).abs().max() < 1e-3


def test_adaptive_solver_never_evaluates_outside_the_interval():
    """torchdiffeq's initial-step probe can look past t_end (it did, to t = -5.8, on this
    image-shaped problem); the score must only ever see times in [t_end, T]."""
    sde = sd.VPSDE()
    images = sd.GaussianMixture([0.5, 0.5], torch.stack([torch.full((1, 4, 4), -1.0), torch.full((1, 4, 4), 1.0)]),
                                [0.1, 0.2])
    seen = []

    def score_fn(x, t):
        seen.append(t)
        return images.score_fn(sde)(x, t)

    sol = sd.sample_ode(score_fn, sde, (8, 1, 4, 4), solver="dopri5", generator=torch.Generator().manual_seed(0))
    times = torch.cat(seen)
    assert sol.x.shape == (8, 1, 4, 4) and times.min() >= 1e-3 and times.max() <= sde.T


def test_generator_reproducibility_and_prior_draws():
    sde = sd.VESDE()
    run = lambda seed: sd.sample_sde(MIXTURE.score_fn(sde), sde, (16, 2), steps=20,  # noqa: E731
                                     generator=torch.Generator().manual_seed(seed)).x
    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))
    x = sd.sample_ode(MIXTURE.score_fn(sde), sde, (16, 2), steps=3, generator=torch.Generator().manual_seed(5),
                      return_trajectory=True).xs[0]
    assert torch.equal(x, sde.prior_sample((16, 2), generator=torch.Generator().manual_seed(5)))
    assert x.dtype == torch.float32 and x.std().item() == pytest.approx(20.0 * 50.0 / 20.0, rel=0.35)


def test_zero_stochasticity_sde_is_the_euler_ode():
    sde = sd.SubVPSDE()
    x = sde.prior_sample((32, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ode = sd.sample_ode(MIXTURE.score_fn(sde), sde, x, steps=30, solver="euler").x
    sde_zero = sd.sample_sde(MIXTURE.score_fn(sde), sde, x, steps=30, stochasticity=0.0,
                             generator=torch.Generator().manual_seed(0)).x
    assert torch.allclose(ode, sde_zero, rtol=0, atol=1e-14)


def test_noise_free_last_step_drops_exactly_the_last_increment():
    sde = sd.VPSDE()
    x = sde.prior_sample((32, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    increments = torch.randn(10, 32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def replay():
        it = iter(increments)
        return lambda t0, t1: next(it) * (t1 - t0).abs().sqrt()

    kwargs = dict(steps=10, t_end=0.1)
    noisy = sd.sample_sde(MIXTURE.score_fn(sde), sde, x, brownian=replay(), noise_free_last_step=False, **kwargs)
    clean = sd.sample_sde(MIXTURE.score_fn(sde), sde, x, brownian=replay(), noise_free_last_step=True, **kwargs)
    t0, t1 = noisy.ts[-2], noisy.ts[-1]
    expected_noise = sde.diffusion(t0) * increments[-1] * (t1 - t0).abs().sqrt()
    torch.testing.assert_close(noisy.x - clean.x, expected_noise, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("solver", ["heun", "dopri5"])
def test_user_grid_and_dtype_follow_x(solver):
    sde = sd.VPSDE()
    grid = torch.tensor([0.01, 0.1, 0.4, 1.0])  # increasing: read from T down
    x = sde.prior_sample((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sol = sd.sample_ode(MIXTURE.score_fn(sde), sde, x, grid=grid, solver=solver, return_trajectory=True)
    assert sol.x.dtype == torch.float64 and sol.ts.dtype == torch.float64
    torch.testing.assert_close(sol.ts, grid.flip(0).double())


def test_progress_bar_runs(capsys):
    sde = sd.VPSDE()
    sd.sample_sde(MIXTURE.score_fn(sde), sde, (4, 2), steps=5, progress=True)
    assert "euler_maruyama" in capsys.readouterr().err


def test_non_finite_score_is_reported_with_step_and_time():
    sde = sd.VPSDE()

    def broken(x, t):  # NaN below t = 0.5
        s = MIXTURE.score_fn(sde)(x, t)
        return torch.where((t < 0.5)[:, None], torch.full_like(s, float("nan")), s)

    # grid 1.0, 0.9804, ...: the first evaluation below 0.5 is at t_26 = 0.4904
    with pytest.raises(sd.NonFiniteError, match=r"after step 26 \(t = 0\.4904 -> 0\.4708\).*score_fn returned"):
        sd.sample_ode(broken, sde, (4, 2), steps=50, solver="euler", t_end=0.02)


@pytest.mark.parametrize("solver", ["heun", "rk4", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "unipc"])
def test_a_score_failing_at_any_stage_of_a_step_is_blamed(solver):
    """NaN below t = 0.5 on finite states: whether the first bad call is a step's first or one of
    its inner stages, it comes by the end of the step whose state fails, so the score is blamed."""
    sde = sd.VPSDE()

    def broken(x, t):
        return torch.where((t < 0.5)[:, None], torch.full_like(x, float("nan")), -x)

    with pytest.raises(sd.NonFiniteError, match=r"score_fn returned non-finite values") as err:
        sd.sample_ode(broken, sde, torch.ones(4, 2, dtype=torch.float64), steps=7, solver=solver, grid="uniform")
    assert err.value.calls is not None


def test_a_score_that_fails_after_many_calls_is_still_blamed():
    """400 Euler steps (h = 0.0025 of a uniform grid), NaN below t = 0.3: the first bad score is
    call 281 (t_281 = 0.2993), past the monitor's first stack of 256 checksums, and it comes in the
    step where the state fails (so it is blamed)."""
    sde = sd.VPSDE()

    def broken(x, t):
        return torch.where((t < 0.3)[:, None], torch.full_like(x, float("nan")), -x)

    with pytest.raises(sd.NonFiniteError, match=r"after step 281 .*score_fn returned") as err:
        sd.sample_ode(broken, sde, torch.ones(4, 2, dtype=torch.float64), steps=400, solver="euler",
                      grid="uniform", t_end=0.0025)
    assert err.value.calls == 282


def test_an_overflowing_state_is_not_blamed_on_the_score():
    """score = -x is finite wherever x is. On VESDE(sigma_max=1e6) Euler with 8 uniform steps grows
    the state by ~1e11 per step until it overflows float32 after step 4; the score of that infinite
    state is infinite, but it came after the state failed: the solver, not score_fn, is at fault."""
    sde = sd.VESDE(sigma_max=1e6)
    with pytest.raises(sd.NonFiniteError, match=r"after step 4 \(t = 0\.5005 -> 0\.375625\)$") as err:
        sd.sample_ode(lambda x, t: -x, sde, torch.ones(4, 2), steps=8, solver="euler", grid="uniform")
    assert err.value.calls == 5


def test_non_finite_state_is_reported_with_step_and_time():
    """x' = x^2 from x=1 blows up at t=1; Euler with h = 0.5 overflows float64 at its 13th step (0-based 12)."""
    term = sd.ODETerm(lambda x, t: x * x)
    ts = torch.linspace(0.0, 10.0, 21, dtype=torch.float64)
    with pytest.raises(sd.NonFiniteError, match=r"after step 12 \(t = 6 -> 6\.5\)") as err:
        sd.integrate(term, torch.ones(3, 1, dtype=torch.float64), ts, solver="euler")
    assert "score_fn" not in str(err.value)


def test_half_precision_states_are_checked_in_float32_and_located():
    """The per-step checksums of float16 states accumulate in float32: a state whose float16 sum
    would overflow is not flagged, and the first state that does hold an infinity is named."""
    ts = torch.arange(0.0, 9.0, dtype=torch.float64)
    big = torch.full((4, 8), 6e4, dtype=torch.float16)  # sum 1.9e6, beyond float16's 65504
    sol = sd.integrate(sd.ODETerm(lambda x, t: torch.zeros_like(x)), big, ts, solver="euler")
    assert torch.equal(sol.x, big)
    # x' = x with h = 1 doubles: 1e3 * 2^(k+1) after step k, 1.28e5 = inf in float16 after step 6
    with pytest.raises(sd.NonFiniteError, match=r"after step 6 \(t = 6 -> 7\)"):
        sd.integrate(sd.ODETerm(lambda x, t: x), torch.full((4, 8), 1e3, dtype=torch.float16), ts, solver="euler")


FIXED_STEP_ODE = [name for name, info in sd.available_solvers("ode").items() if not info.adaptive]


@pytest.mark.parametrize("solver", FIXED_STEP_ODE)
@pytest.mark.parametrize("sde", [sd.VPSDE(), sd.VESDE()], ids=["vp", "ve"])
def test_a_bfloat16_state_stays_bfloat16_on_a_float32_grid(sde, solver):
    """Times are carried in float32 for half-precision states, and the score gets them so; their
    0-d coefficients must not promote the state."""
    seen = set()

    def score(y, t):
        seen.add((y.dtype, t.dtype))
        return -y / (1.0 + t[:, None])

    x = sde.prior_sample((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    sol = sd.sample_ode(score, sde, x, steps=6, solver=solver)
    assert sol.x.dtype == torch.bfloat16 and sol.ts.dtype == torch.float32
    assert seen == {(torch.bfloat16, torch.float32)}


def test_a_bfloat16_state_gets_the_full_1000_step_grid():
    """bfloat16 resolves 2^-8 near t = 1: a 1000-step grid in it repeated times ("the time grid
    must be ... strictly monotone" from sample_sde's defaults). In float32 it is the grid asked
    for. (The samples themselves are another matter: a bfloat16 state loses most of a
    1000-step update of size 1e-3 to rounding, so sample in float32 with a bfloat16 network.)"""
    sde = sd.VPSDE()
    x = sde.prior_sample((8, 2), generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    sol = sd.sample_sde(MIXTURE.score_fn(sde), sde, x, generator=torch.Generator().manual_seed(1))
    assert sol.x.dtype == torch.bfloat16 and bool(torch.isfinite(sol.x).all())
    torch.testing.assert_close(sol.ts, sd.time_grid(sde, 1000, t_end=1e-3, dtype=torch.float32), rtol=0, atol=0)


def test_a_bfloat16_ddpm_calls_the_network_at_its_own_timesteps():
    """bfloat16 cannot hold 999: a time rounded to it gave a 1000-step model the timesteps 1000,
    1000, 996, ... The network gets 999, 998, ..., 0, and its float32 alpha, sigma do not promote
    the state."""
    ddpm = sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    seen = []

    def eps_model(y, n):
        seen.append(n)
        return torch.zeros_like(y)

    x = ddpm.prior_sample((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    sol = sd.sample_ddpm(sd.discrete_score_fn(eps_model, ddpm), ddpm, x, generator=torch.Generator().manual_seed(1))
    assert sol.x.dtype == torch.bfloat16
    assert torch.equal(torch.stack(seen)[:, 0], torch.arange(999, -1, -1))


def test_annealed_langevin_keeps_a_bfloat16_state():
    sde = sd.VESDE()
    x = sde.prior_sample((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    sol = sd.sample_ald(lambda y, t: -y / (1.0 + t[:, None] ** 2), sde, x, levels=4, steps_per_level=2,
                        generator=torch.Generator().manual_seed(1))
    assert sol.x.dtype == torch.bfloat16


@pytest.mark.parametrize("solver", ["srk", "reversible_heun"])
def test_torchsde_solvers_keep_a_bfloat16_state(solver):
    sde = sd.VPSDE()
    x = sde.prior_sample((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    sol = sd.sample_sde(lambda y, t: -y, sde, x, steps=6, solver=solver, generator=torch.Generator().manual_seed(1))
    assert sol.x.dtype == torch.bfloat16 and bool(torch.isfinite(sol.x).all())


def test_an_adaptive_solver_that_cannot_meet_its_tolerance_says_so():
    """torchdiffeq gives up on a tolerance it cannot meet with 'AssertionError: underflow in dt'
    (a float16 state on EDM at the default 1e-5): a ValueError naming rtol, atol and the dtype.
    Tolerances below the dtype's resolution are not refused up front: the error estimate shrinks
    with the step, so float32 at rtol 1e-8, atol 1e-9 is met (about 3,400 field calls)."""
    sde = sd.EDMSDE()
    x = sde.prior_sample((64, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float16)
    with pytest.raises(ValueError, match=r"could not meet rtol=1e-05, atol=1e-05 on a torch.float16 state"):
        sd.sample_ode(lambda y, t: -y / (1.0 + t[:, None] ** 2), sde, x, solver="dopri5")
    ve = sd.VESDE()
    x = ve.prior_sample((4, 2), generator=torch.Generator().manual_seed(0))
    sol = sd.sample_ode(lambda y, t: -y, ve, x, solver="dopri5", rtol=1e-8, atol=1e-9)
    assert sol.x.dtype == torch.float32 and bool(torch.isfinite(sol.x).all())


def test_a_float32_score_that_overflows_a_float16_state_is_blamed():
    """The score is cast to a half-precision state's dtype before the monitor checks it, so a
    finite float32 score beyond float16's range is the score's failure, not the state's."""
    sde = sd.VESDE()
    x = sde.prior_sample((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float16)
    with pytest.raises(sd.NonFiniteError, match="after step 0 .*score_fn returned non-finite"):
        sd.sample_ode(lambda y, t: torch.full(y.shape, 1e6), sde, x, steps=4, solver="euler")


def test_a_state_promoted_to_float64_is_checked_in_float64():
    """x' = 1e300 x in float64 from a float32 start: the state after step 0 (5e299) is finite
    beyond float32's range and must not be flagged; step 1 overflows float64."""
    ts = torch.tensor([0.0, 0.5, 1.0, 1.5])
    with pytest.raises(sd.NonFiniteError, match=r"after step 1 \(t = 0\.5 -> 1\)"):
        sd.integrate(sd.ODETerm(lambda x, t: x.double() * 1e300), torch.ones(2, 1), ts, solver="euler")


def test_gradients_flow_through_the_integration_loop():
    """The loop's finiteness checks stay out of autograd: Euler on x' = -x with h = 1/4 gives
    x_4 = (3/4)^4 x_0, so d sum(x_4) / d x_0 = (3/4)^4; through sample_ode, the gradient of the
    probability-flow solution of a standard Gaussian with respect to the start is finite."""
    x0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    sol = sd.integrate(sd.ODETerm(lambda x, t: -x), x0, torch.linspace(0.0, 1.0, 5, dtype=torch.float64),
                       solver="euler")
    sol.x.sum().backward()
    torch.testing.assert_close(x0.grad, torch.full_like(x0, 0.75**4))
    sde = sd.VPSDE()
    x_T = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    sd.sample_ode(lambda x, t: -x, sde, x_T, steps=4).x.sum().backward()
    assert x_T.grad is not None and bool(torch.isfinite(x_T.grad).all())


def test_score_of_the_wrong_shape_is_rejected():
    sde = sd.VPSDE()
    with pytest.raises(ValueError, match=r"score_fn must return a tensor of the shape of x \(4, 2\), got \(4,\)"):
        sd.sample_ode(lambda x, t: x.sum(1), sde, (4, 2), steps=2)
    with pytest.raises(ValueError, match="score_fn must return a tensor"):
        sd.sample_sde(lambda x, t: 1.0, sde, (4, 2), steps=2)
