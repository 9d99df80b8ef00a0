"""The classic samplers are discretizations of the continuous processes (issue 3), measured.

* DDIM (eta = 0) is the Euler step of the probability-flow ODE in ``y = x / alpha``,
  ``rho = sigma / alpha`` (to round-off), and converges to the ODE at first order.
* DDPM's ancestral step and one Euler–Maruyama step of the reverse VP SDE differ by O(h^2) in the
  mean and the variance of the step (measured slopes), DDIM's ``eta`` is the reverse process's
  stochasticity, and all classic samplers reproduce a Gaussian mixture within stated errors.
* The discrete timestep grids, NFE counts, trajectories, seeding, input checks and x0 clipping.

Every sampling check is ``Z`` standard errors (computed from the sample size) plus a
discretization allowance measured with 40,000 samples and stated next to each case.
"""

import math

import pytest
import torch

import sdediff as sd
from sdediff.solvers import DDIM, Ancestral

from mixture_checks import Allowance, assert_matches_mixture

F64 = torch.float64
T_END = 1e-3
Z = 4.5  # standard errors: a two-sided false alarm ~7e-6 per check (and fixed seeds make runs repeatable)

# Two well-separated modes (more than 8 component stds apart): classifying samples by the target's
# most likely component misassigns ~1e-7 of them (the boundary is 5 stds from the narrow mode).
GM = sd.GaussianMixture([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [0.3, 0.5])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def t64(v):
    return torch.tensor(v, dtype=F64)


def loglog_slope(hs, errs):
    """Least-squares slope of log(err) against log(h)."""
    lh, le = torch.log(torch.tensor(hs, dtype=F64)), torch.log(torch.tensor(errs, dtype=F64))
    lh, le = lh - lh.mean(), le - le.mean()
    return float((lh * le).sum() / (lh * lh).sum())


def ddpm_linear_betas(n=1000):
    """Ho et al.'s linear betas, 1e-4 .. 0.02 for n = 1000."""
    return torch.linspace(0.1 / n, 20.0 / n, n, dtype=F64)


BETAS_20 = torch.linspace(0.01, 0.3, 20, dtype=F64)  # a short DDPM schedule of N = 20 steps


# --------------------------------------------------------------------------------------------
# 1. One DDIM step = one Euler step of the probability-flow ODE in (x / alpha, sigma / alpha)
# --------------------------------------------------------------------------------------------

SCALED_SDES = {
    "vp_linear": lambda: sd.VPSDE(),
    "vp_cosine": lambda: sd.VPSDE(schedule="cosine"),
    "subvp": lambda: sd.SubVPSDE(),
    "ve": lambda: sd.VESDE(sigma_max=20.0),
}


def euler_in_scaled_variables(sde, x, t0, t1):
    """``y_s = y_t + (rho_s - rho_t) eps`` with ``y = x / alpha``, ``rho = sigma / alpha``, ``eps = -sigma_t score``."""
    a0, s0 = sde.marginal(t0)
    a1, s1 = sde.marginal(t1)
    eps = -s0 * GM.marginal_score(sde, x, t0)
    y = x / a0 + (s1 / a1 - s0 / a0) * eps
    return a1 * y


@pytest.mark.parametrize("name", list(SCALED_SDES))
def test_ddim_step_is_exponential_euler_in_scaled_variables(name):
    sde = SCALED_SDES[name]()
    score_fn = GM.score_fn(sde)
    process = sd.ReverseProcess(sde, score_fn, 0.0)
    ddim = sd.get_solver("ddim", "ode")
    x = GM.diffused(sde, 0.7).sample(64, generator=gen(0))

    # In these variables the probability-flow ODE is dy/drho = eps(x, t): check that the ODE's drift
    # is alpha' / alpha x + alpha rho' eps (derivatives by central differences, error ~1e-9), so
    # the Euler step below is a step of *this* ODE.
    t, d = t64(0.5), 1e-5
    (a_p, s_p), (a_m, s_m), (a, s) = sde.marginal(t + d), sde.marginal(t - d), sde.marginal(t)
    dlog_alpha, drho = (torch.log(a_p) - torch.log(a_m)) / (2 * d), (s_p / a_p - s_m / a_m) / (2 * d)
    xt = GM.diffused(sde, 0.5).sample(64, generator=gen(1))
    eps = -s * GM.marginal_score(sde, xt, t)
    drift = process.drift(xt, t)
    assert torch.allclose(drift, dlog_alpha * xt + a * drho * eps, rtol=1e-7, atol=1e-7 * drift.abs().max().item())

    for t0, t1 in [(0.7, 0.5), (0.7, 0.69), (0.7, 0.05)]:
        t0, t1 = t64(t0), t64(t1)
        expected = euler_in_scaled_variables(sde, x, t0, t1)
        scale = expected.abs().max().item()
        step = ddim.step(process.ode_term(), x, t0, t1)
        assert (step - expected).abs().max().item() < 1e-12 * scale  # measured <= 5e-16
        sol = sd.sample_ode(score_fn, sde, x, solver="ddim", grid=torch.stack([t0, t1]))
        assert sol.nfe == 1
        assert (sol.x - expected).abs().max().item() < 1e-12 * scale
        # not a vacuous identity: the Euler step in x itself is far off for the long step
        if float(t0 - t1) > 0.5:
            plain = x + (t1 - t0) * process.drift(x, t0)
            assert (plain - expected).abs().max().item() > 1e-3 * scale

    # sample_ddim with one timestep of one: the single step from T to t = 0 (rho = 0 for VP).
    x_T = GM.diffused(sde, sde.T).sample(64, generator=gen(2))
    sol = sd.sample_ddim(score_fn, sde, x_T, steps=1, num_train_timesteps=1)
    assert sol.ts.tolist() == [sde.T, 0.0] and sol.nfe == 1
    expected = euler_in_scaled_variables(sde, x_T, t64(sde.T), t64(0.0))
    assert (sol.x - expected).abs().max().item() < 1e-12 * expected.abs().max().item()


# --------------------------------------------------------------------------------------------
# 2. DDIM with k steps converges at first order to the probability-flow ODE
# --------------------------------------------------------------------------------------------

def median_error(x, ref):
    # Median over samples: the few trajectories that start near the boundary between the modes
    # amplify every error (and may switch modes at coarse k); the median measures the typical one.
    return (x - ref).norm(dim=1).median().item()


@pytest.mark.parametrize("name", ["vp_linear", "ve"])
def test_ddim_converges_at_first_order_to_the_ode(name):
    sde = SCALED_SDES[name]()
    score_fn = GM.score_fn(sde)
    x = GM.diffused(sde, sde.T).sample(64, generator=gen(3))
    ref = sd.sample_ode(score_fn, sde, x, solver="dopri5", rtol=1e-10, atol=1e-10, t_end=T_END).x
    ks = [16, 32, 64, 128, 256]
    errs = [median_error(sd.sample_ode(score_fn, sde, x, solver="ddim", steps=k, t_end=T_END).x, ref) for k in ks]
    # measured: VP median errors 0.097 .. 0.0058, slope 1.02; VE 0.094 .. 0.0057, slope 1.01
    slope = -loglog_slope(ks, errs)
    assert abs(slope - 1.0) < 0.15, (slope, errs)
    assert errs[-1] < 0.02, errs


def test_sample_ddim_converges_at_first_order_to_the_ode_down_to_zero():
    # "trailing" spacing of N = 1024 timesteps with k | 1024 steps is the uniform grid
    # 1, 1 - 1/k, ..., 1/k, then t = 0; the reference integrates the ODE to t = 0 with dopri5.
    sde = sd.VPSDE()
    score_fn = GM.score_fn(sde)
    x = GM.diffused(sde, sde.T).sample(64, generator=gen(4))
    process = sd.ReverseProcess(sde, score_fn, 0.0)
    ref = sd.integrate(process.ode_term(), x, torch.tensor([1.0, 0.0], dtype=F64), solver="dopri5",
                       rtol=1e-10, atol=1e-10).x
    ks = [16, 32, 64, 128, 256]
    errs = []
    for k in ks:
        sol = sd.sample_ddim(score_fn, sde, x, steps=k, spacing="trailing", num_train_timesteps=1024)
        assert torch.allclose(sol.ts, torch.linspace(1.0, 0.0, k + 1, dtype=F64), rtol=0, atol=1e-15)
        errs.append(median_error(sol.x, ref))
    slope = -loglog_slope(ks, errs)  # measured 0.96 (median errors 0.104 .. 0.0073)
    assert abs(slope - 1.0) < 0.15, (slope, errs)


# --------------------------------------------------------------------------------------------
# 3. DDPM's ancestral step vs one Euler–Maruyama step of the reverse VP SDE
# --------------------------------------------------------------------------------------------

STEP_SIZES = [1 / 50, 1 / 100, 1 / 200, 1 / 400, 1 / 800]


@pytest.mark.parametrize("schedule", ["constant_beta", "linear"])
def test_ddpm_step_matches_euler_maruyama_to_second_order(schedule):
    """Same x, same z: the step means differ by O(h^2), the step variances by O(h^2).

    The DDPM variance is ``beta_d = 1 - alpha_t^2 / alpha_s^2 = beta(t) h + O(h^2)`` (for any
    schedule, constant beta included: ``1 - exp(-b h) = b h - (b h)^2 / 2 + ...``), so the
    *standard deviations* multiplying the shared z differ by ``sqrt(beta_d) - sqrt(beta h) = O(h^1.5)``;
    pathwise (same z) the full steps therefore differ at slope 1.5, while the one-step laws
    N(mean, var) differ by O(h^2) in mean and variance, which is what weak order 1 needs.
    """
    sde = sd.VPSDE(beta_min=5.0, beta_max=5.0) if schedule == "constant_beta" else sd.VPSDE()
    score_fn = GM.score_fn(sde)
    term = sd.ReverseProcess(sde, score_fn, 1.0).sde_term()
    ddpm, em = Ancestral("beta"), sd.get_solver("euler_maruyama", "sde")
    g = gen(5)
    for t in [0.2, 0.5, 0.9]:
        t0 = t64(t)
        x = GM.diffused(sde, t).sample(256, generator=g)
        z = torch.randn(x.shape, generator=g, dtype=F64)
        mean_d, var_d, noise_d, full_d = [], [], [], []
        for h in STEP_SIZES:
            t1 = t0 - h
            dw = z * math.sqrt(h)
            m_ddpm, m_em = ddpm.step(term, x, t0, t1, None), em.step(term, x, t0, t1, None)
            x_ddpm, x_em = ddpm.step(term, x, t0, t1, dw), em.step(term, x, t0, t1, dw)

            # Ho et al.'s step written out: x_{t-1} = (x_t - beta/sqrt(1-abar) eps)/sqrt(1-beta) + sqrt(beta) z
            abar_t, abar_s = sde.marginal(t0)[0] ** 2, sde.marginal(t1)[0] ** 2
            beta = 1.0 - abar_t / abar_s
            eps = -torch.sqrt(1.0 - abar_t) * GM.marginal_score(sde, x, t0)
            by_hand = (x - beta / torch.sqrt(1.0 - abar_t) * eps) / torch.sqrt(1.0 - beta) + torch.sqrt(beta) * z
            assert (x_ddpm - by_hand).abs().max().item() < 1e-12 * by_hand.abs().max().item()
            # and Euler–Maruyama written out: x + h (beta/2 x + beta score) + sqrt(beta(t)) dw (h = |dt|)
            b_t = sde.diffusion(t0) ** 2
            em_by_hand = x + h * (0.5 * b_t * x + b_t * GM.marginal_score(sde, x, t0)) + torch.sqrt(b_t) * dw
            assert (x_em - em_by_hand).abs().max().item() < 1e-12 * em_by_hand.abs().max().item()

            mean_d.append((m_ddpm - m_em).abs().max().item())
            var_d.append(abs(beta - b_t * h).item())
            noise_d.append(((x_ddpm - m_ddpm) - (x_em - m_em)).abs().max().item())
            full_d.append((x_ddpm - x_em).abs().max().item())
            if schedule == "constant_beta":  # the noise amplitudes differ by exactly sqrt(1 - e^{-bh}) - sqrt(bh)
                gap = math.sqrt(-math.expm1(-5.0 * h)) - math.sqrt(5.0 * h)
                assert torch.allclose((x_ddpm - m_ddpm) - (x_em - m_em), gap * z, rtol=0, atol=1e-13)
        # measured (t = 0.2, 0.5, 0.9, both schedules): mean 1.98-2.00, variance 1.96-1.99, noise 1.47-1.49,
        # full step 1.47-1.51
        for what, errs, order in [("mean", mean_d, 2.0), ("variance", var_d, 2.0), ("noise", noise_d, 1.5),
                                  ("full step", full_d, 1.5)]:
            slope = loglog_slope(STEP_SIZES, errs)
            assert abs(slope - order) < 0.15, (t, what, slope, errs)


# --------------------------------------------------------------------------------------------
# 5. DDIM's eta is the reverse process's stochasticity
# --------------------------------------------------------------------------------------------

ETA_STEP_SIZES = [1 / 100, 1 / 200, 1 / 400, 1 / 800, 1 / 1600]


@pytest.mark.parametrize("name", ["vp_linear", "subvp", "ve"])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_is_the_stochasticity(name, eta):
    sde = SCALED_SDES[name]()
    score_fn = GM.score_fn(sde)
    term = sd.ReverseProcess(sde, score_fn, eta).sde_term()
    anc, em = Ancestral("posterior"), sd.get_solver("euler_maruyama", "sde")
    g = gen(6)
    for t in [0.3, 0.8]:
        t0 = t64(t)
        x = GM.diffused(sde, t).sample(128, generator=g)
        z = torch.randn(x.shape, generator=g, dtype=F64)
        g2 = sde.diffusion(t0) ** 2
        mean_d, ratio_d = [], []
        for h in ETA_STEP_SIZES:
            t1 = t0 - h
            mean = anc.step(term, x, t0, t1, None)
            noise = anc.step(term, x, t0, t1, z * math.sqrt(h)) - mean
            c = (noise * z).sum() / (z * z).sum()  # the noise is c z
            assert torch.allclose(noise, c * z, rtol=0, atol=1e-13)  # round-off of (mean + c z) - mean
            # c^2 = eta^2 sigma_s^2 (1 - r), r = (alpha_t sigma_s / (alpha_s sigma_t))^2
            (a_t, s_t), (a_s, s_s) = sde.marginal(t0), sde.marginal(t1)
            r = (a_t * s_s / (a_s * s_t)) ** 2
            assert abs(c**2 / (eta**2 * s_s**2 * (1 - r)) - 1).item() < 1e-9
            mean_d.append((mean - em.step(term, x, t0, t1, None)).abs().max().item())
            ratio_d.append(abs((c**2 / (eta**2 * g2 * h)).item() - 1.0))
        # measured: mean slopes 1.98-2.03; |c^2 / (eta^2 g^2 h) - 1| slopes 0.96-0.99, 0.005-0.014 at h = 1/1600
        assert abs(loglog_slope(ETA_STEP_SIZES, mean_d) - 2.0) < 0.15, (t, mean_d)
        assert abs(loglog_slope(ETA_STEP_SIZES, ratio_d) - 1.0) < 0.15, (t, ratio_d)
        assert ratio_d[-1] < 0.03, ratio_d


def test_ddim_eta_zero_and_one_are_the_ddim_and_ddpm_posterior_samplers():
    sde = sd.VPSDE()
    score_fn = GM.score_fn(sde)
    x = GM.diffused(sde, 0.6).sample(64, generator=gen(7))
    t0, t1 = t64(0.6), t64(0.45)
    dw = torch.randn(x.shape, generator=gen(8), dtype=F64) * math.sqrt(0.15)
    # eta = 0: the ancestral step has no noise and is the DDIM step
    anc0 = Ancestral("posterior").step(sd.ReverseProcess(sde, score_fn, 0.0).sde_term(), x, t0, t1, dw)
    ddim = DDIM().step(sd.ReverseProcess(sde, score_fn, 0.0).ode_term(), x, t0, t1)
    assert (anc0 - ddim).abs().max().item() < 1e-13 * ddim.abs().max().item()
    # eta = 1: DDIM with DDPM's timesteps and noise is DDPM with the posterior variance, sample for sample
    a = sd.sample_ddim(score_fn, sde, (500, 2), steps=20, eta=1.0, spacing="leading", generator=gen(9), dtype=F64)
    b = sd.sample_ddpm(score_fn, sde, (500, 2), steps=20, variance="posterior", generator=gen(9), dtype=F64)
    assert torch.equal(a.x, b.x)


# --------------------------------------------------------------------------------------------
# 4. The classic samplers reproduce the mixture
# --------------------------------------------------------------------------------------------

N_SAMPLES = 4000
VP = sd.VPSDE()
VP_DISCRETE = sd.VPSDE.from_betas(ddpm_linear_betas(1000))
VE_PC = sd.VESDE(sigma_min=0.01, sigma_max=15.0)
# ALD: sigma_min = 0.1 and step_ratio = 5e-3 = sigma_L^2 / 2, so that a_i / sigma_i^2 = 1/2 at the
# high levels (bias ~1/8 in variance there, relaxed by the later levels) while the last levels,
# where a_i / (s^2 + sigma_i^2) is small, still mix (~1-3 relaxation times in 100 steps). With
# NCSN's sigma_L = 0.01, step_ratio = 2e-5 the last ~4 levels barely move (a_L / s^2 ~ 2e-4) and
# the samples keep the variance of level ~0.1 (+10-14% here), i.e. ALD is then
# accurate only at that effective level.
VE_ALD = sd.VESDE(sigma_min=0.1, sigma_max=15.0)


def exact_start(sde, seed):
    return GM.diffused(sde, sde.T).sample(N_SAMPLES, generator=gen(seed))


def _pc(sde, predictor, seed):
    return lambda: sd.sample_pc(GM.score_fn(sde), sde, exact_start(sde, seed), steps=200, predictor=predictor,
                                t_end=T_END, generator=gen(seed))


def _sde(sde, seed):
    return lambda: sd.sample_sde(GM.score_fn(sde), sde, exact_start(sde, seed), steps=200, t_end=T_END,
                                 generator=gen(seed))


# name: (run, target, allowance). Allowances: the largest bias measured over both modes with
# 40,000 samples (itself uncertain by ~1.3% in variance and ~0.003 in means), rounded up. The
# variance biases of DDPM are real first-order effects: the posterior variance (= DDIM eta = 1)
# under-disperses, the beta variance over-disperses, as the exact variance recursion of the
# sampler for one Gaussian mode gives (200 steps: -10.3% / -6.8% and +3.6% / +1.7% for stds 0.3 / 0.5).
MIXTURE_CASES = {
    # 200 DDPM steps of 5 training steps each on the continuous VPSDE; measured var +6.2% / +4.1%
    "ddpm_beta_200": (lambda: sd.sample_ddpm(GM.score_fn(VP), VP, (N_SAMPLES, 2), steps=200, variance="beta",
                                             generator=gen(11), dtype=F64), GM, Allowance(0.01, 0.01, 0.08, 0.02)),
    "ddpm_posterior_200": (lambda: sd.sample_ddpm(GM.score_fn(VP), VP, (N_SAMPLES, 2), steps=200,
                                                  variance="posterior", generator=gen(12), dtype=F64),
                           GM, Allowance(0.01, 0.01, 0.13, 0.02)),  # measured var -10.8% / -7.0%
    # Ho et al.'s 1000 betas, all 1000 steps (the default); measured var: beta +1.3%, posterior -3.8%
    "ddpm_beta_discrete": (lambda: sd.sample_ddpm(GM.score_fn(VP_DISCRETE), VP_DISCRETE, (N_SAMPLES, 2),
                                                  variance="beta", generator=gen(13), dtype=F64),
                           GM, Allowance(0.01, 0.01, 0.03, 0.02)),
    "ddpm_posterior_discrete": (lambda: sd.sample_ddpm(GM.score_fn(VP_DISCRETE), VP_DISCRETE, (N_SAMPLES, 2),
                                                       variance="posterior", generator=gen(14), dtype=F64),
                                GM, Allowance(0.01, 0.01, 0.05, 0.02)),
    # DDIM 100 steps: var -8.7%, mean 0.009, covariance +0.02 (deterministic flow, first order)
    "ddim_eta0_100": (lambda: sd.sample_ddim(GM.score_fn(VP), VP, (N_SAMPLES, 2), steps=100, eta=0.0,
                                             generator=gen(15), dtype=F64), GM, Allowance(0.01, 0.015, 0.11, 0.03)),
    # DDIM eta = 1 is DDPM with the posterior variance: measured var -10.1%
    "ddim_eta1_200": (lambda: sd.sample_ddim(GM.score_fn(VP), VP, (N_SAMPLES, 2), steps=200, eta=1.0,
                                             generator=gen(16), dtype=F64), GM, Allowance(0.01, 0.01, 0.13, 0.02)),
    # ALD from the prior N(0, 15^2), 10 levels x 100 steps; target: the mixture convolved with N(0, 0.1^2);
    # measured var +1.8%
    "ald": (lambda: sd.sample_ald(GM.score_fn(VE_ALD), VE_ALD, (N_SAMPLES, 2), levels=10, steps_per_level=100,
                                  step_ratio=5e-3, generator=gen(17), dtype=F64),
            GM.diffused(VE_ALD, 0.0), Allowance(0.01, 0.01, 0.05, 0.02)),
    # PC, 200 steps, Langevin corrector with snr 0.16 (its finite step inflates the variance):
    # measured var up to +5.8%, means within 0.0064, weights within 0.0062
    **{f"pc_vp_{p}": (_pc(VP, p, 18 + i), GM.diffused(VP, T_END), Allowance(0.01, 0.01, 0.08, 0.02))
       for i, p in enumerate(["reverse_diffusion", "euler_maruyama", "ancestral"])},
    **{f"pc_ve_{p}": (_pc(VE_PC, p, 21 + i), GM.diffused(VE_PC, T_END), Allowance(0.01, 0.01, 0.08, 0.02))
       for i, p in enumerate(["reverse_diffusion", "euler_maruyama", "ancestral"])},
    # baseline: Euler–Maruyama on the reverse SDE, 200 steps; measured var -2.0%, means within 0.010
    "sde_vp": (_sde(VP, 24), GM.diffused(VP, T_END), Allowance(0.01, 0.015, 0.05, 0.02)),
    "sde_ve": (_sde(VE_PC, 25), GM.diffused(VE_PC, T_END), Allowance(0.01, 0.015, 0.05, 0.02)),
}


@pytest.mark.parametrize("case", list(MIXTURE_CASES))
def test_classic_samplers_reproduce_the_mixture(case):
    run, target, allow = MIXTURE_CASES[case]
    sol = run()
    assert sol.x.shape == (N_SAMPLES, 2) and sol.x.dtype == F64
    assert_matches_mixture(sol.x, target, Z, allow)


def test_ald_is_ncsn_annealed_langevin():
    """By hand: x <- x + (a_i / 2) score(x, sigma_i) + sqrt(a_i) z, a_i = r sigma_i^2 / sigma_L^2 (Song, Ermon)."""
    ve = sd.VESDE(sigma_min=0.1, sigma_max=15.0)
    sigmas = torch.tensor([15.0, 4.0, 1.0, 0.3], dtype=F64)
    ratio, inner = 5e-3, 3
    x = GM.diffused(ve, 1.0).sample(32, generator=gen(43))
    sol = sd.sample_ald(GM.score_fn(ve), ve, x, levels=sigmas, steps_per_level=inner, step_ratio=ratio,
                        generator=gen(44), return_trajectory=True)
    g, y = gen(44), x
    for i, sigma in enumerate(sigmas):
        t = t64(math.log(sigma / 0.1) / math.log(15.0 / 0.1))
        a = ratio * sigma**2 / sigmas[-1] ** 2
        for _ in range(inner):
            z = torch.randn(y.shape, generator=g, dtype=F64)
            y = y + 0.5 * a * GM.marginal_score(ve, y, t) + torch.sqrt(a) * z
        assert (sol.xs[i] - y).abs().max().item() < 1e-10 * y.abs().max().item(), i
    assert sol.nfe == 4 * inner


@pytest.mark.parametrize("name", ["vp_linear", "ve"])
def test_pc_is_score_sde_corrector_then_predictor(name):
    """By hand: one Langevin step (eps = 2 (snr mean||z|| / mean||score||)^2, batch-averaged norms),
    then the reverse-diffusion predictor x <- (2 - a) x + v score + sqrt(v) z with a = alpha_t / alpha_s,
    v = sigma_t^2 - a^2 sigma_s^2 (score_sde's order and rule)."""
    sde = SCALED_SDES[name]()
    snr, steps = 0.16, 3
    x = GM.diffused(sde, sde.T).sample(32, generator=gen(45))
    sol = sd.sample_pc(GM.score_fn(sde), sde, x, steps=steps, snr=snr, generator=gen(46), return_trajectory=True)
    ts = sol.ts
    g, y = gen(46), x
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        z = torch.randn(y.shape, generator=g, dtype=F64)
        score = GM.marginal_score(sde, y, t)
        eps = 2.0 * (snr * z.norm(dim=1).mean() / score.norm(dim=1).mean()) ** 2
        y = y + eps * score + torch.sqrt(2.0 * eps) * z
        (a_t, s_t), (a_s, s_s) = sde.marginal(t), sde.marginal(s)
        a = a_t / a_s
        v = s_t**2 - a**2 * s_s**2
        y = (2.0 - a) * y + v * GM.marginal_score(sde, y, t)
        if i < steps - 1:  # the last predictor step is noise-free
            y = y + torch.sqrt(v) * torch.randn(y.shape, generator=g, dtype=F64)
        assert (sol.xs[i + 1] - y).abs().max().item() < 1e-10 * y.abs().max().item(), i
    assert sol.nfe == 2 * steps


# --------------------------------------------------------------------------------------------
# 6. Discrete timestep grids
# --------------------------------------------------------------------------------------------

# N = 20 training timesteps, 5 sampling steps, worked out by hand:
EXPECTED_TIMESTEPS = {
    "uniform": [16, 12, 8, 4, 0],  # c = 20 // 5 = 4: 0, 4, 8, 12, 16
    "leading": [16, 12, 8, 4, 0],
    "trailing": [19, 15, 11, 7, 3],  # round(20 - 4 i) - 1
    "linspace": [19, 14, 10, 5, 0],  # round(0, 4.75, 9.5, 14.25, 19), half to even
    "quadratic": [16, 9, 4, 1, 0],  # floor(linspace(0, sqrt(0.8 * 20) = 4, 5)^2)
}


@pytest.mark.parametrize("spacing", list(EXPECTED_TIMESTEPS))
def test_discrete_time_grid_spacings(spacing):
    expected = EXPECTED_TIMESTEPS[spacing]
    for sde in [sd.VPSDE(), sd.VESDE(), sd.SubVPSDE()]:
        ts = sd.discrete_time_grid(sde, 5, spacing=spacing, num_train_timesteps=20)
        assert ts.dtype == F64 and ts.shape == (6,)
        assert ts[-1].item() == 0.0
        assert torch.allclose(ts[:-1], sde.T * (torch.tensor(expected, dtype=F64) + 1) / 20, rtol=0, atol=1e-15)
    # a from_betas VPSDE brings its own N; alpha(t_n)^2 is its alphas_cumprod[n]
    betas = BETAS_20
    sde = sd.VPSDE.from_betas(betas)
    ts = sd.discrete_time_grid(sde, 5, spacing=spacing)
    n = torch.round(ts[:-1] * 20).long() - 1
    assert n.tolist() == expected
    abar = torch.cumprod(1.0 - betas, 0)
    alpha = sde.marginal(ts)[0]
    assert torch.allclose(alpha[:-1] ** 2, abar[n], rtol=1e-14, atol=0)
    assert alpha[-1].item() == 1.0
    # the same through a sampler
    sol = sd.sample_ddim(GM.score_fn(sde), sde, (4, 2), steps=5, spacing=spacing, dtype=F64)
    assert torch.equal(sol.ts, ts)


def test_discrete_time_grid_all_steps_and_float32():
    sde = sd.VPSDE.from_betas(ddpm_linear_betas(1000))
    ts = sd.discrete_time_grid(sde, 1000, spacing="leading")
    assert torch.allclose(ts, torch.arange(1000, -1, -1, dtype=F64) / 1000, rtol=0, atol=1e-15)
    abar = torch.cumprod(1.0 - ddpm_linear_betas(1000), 0)
    assert torch.allclose(sde.marginal(ts[:-1])[0] ** 2, abar.flip(0), rtol=1e-13, atol=0)
    ts32 = sd.discrete_time_grid(sde, 10, spacing="trailing", dtype=torch.float32)
    assert ts32.dtype == torch.float32 and ts32[0].item() == 1.0 and ts32[-1].item() == 0.0


def test_discrete_time_grid_errors():
    vp = sd.VPSDE()
    with pytest.raises(ValueError, match="steps must be <= the 20 training timesteps"):
        sd.discrete_time_grid(vp, 21, num_train_timesteps=20)
    with pytest.raises(ValueError, match="spacing must be one of"):
        sd.discrete_time_grid(vp, 5, spacing="karras")
    # quadratic with 10 of 20: floor(linspace(0, 4, 10)^2) = 0, 0, 0, 1, 3, ... repeats timesteps
    with pytest.raises(ValueError, match="repeats timesteps"):
        sd.discrete_time_grid(vp, 10, spacing="quadratic", num_train_timesteps=20)
    with pytest.raises(ValueError, match="num_train_timesteps=1000 disagrees"):
        sd.discrete_time_grid(sd.VPSDE.from_betas(BETAS_20), 5, num_train_timesteps=1000)
    with pytest.raises(ValueError, match="steps must be <= the 1000"):
        sd.sample_ddpm(GM.score_fn(vp), vp, (4, 2), steps=1001)
    with pytest.raises(ValueError, match="repeats timesteps"):
        sd.sample_ddim(GM.score_fn(vp), vp, (4, 2), steps=10, spacing="quadratic", num_train_timesteps=20)
    with pytest.raises(TypeError, match="steps"):
        sd.discrete_time_grid(vp, 2.5)
    with pytest.raises(TypeError, match="sde must be an sdediff SDE"):
        sd.discrete_time_grid("vp", 5)


# --------------------------------------------------------------------------------------------
# 7. NFE, trajectories, progress, seeding, input validation
# --------------------------------------------------------------------------------------------

def test_nfe_trajectories_and_progress(capsys):
    vp, ve = sd.VPSDE(), sd.VESDE(sigma_max=15.0)
    f_vp, f_ve = GM.score_fn(vp), GM.score_fn(ve)
    shape = (7, 2)
    runs = {
        "ancestral": (sd.sample_ddpm(f_vp, vp, shape, steps=12, return_trajectory=True, progress=True), 12, 13),
        "ddim": (sd.sample_ddim(f_vp, vp, shape, steps=9, return_trajectory=True, progress=True), 9, 10),
        "ddim_eta": (sd.sample_ddim(f_vp, vp, shape, steps=9, eta=0.5, return_trajectory=True), 9, 10),
        "AnnealedLangevin": (sd.sample_ald(f_ve, ve, shape, levels=4, steps_per_level=5, return_trajectory=True,
                                           progress=True), 20, 4),
        "reverse_diffusion": (sd.sample_pc(f_ve, ve, shape, steps=8, n_corrector_steps=3, return_trajectory=True,
                                           progress=True), 8 * 4, 9),
        "pc_vp_em": (sd.sample_pc(f_vp, vp, shape, steps=8, predictor="euler_maruyama", return_trajectory=True),
                     8 * 2, 9),
        "pc_no_corrector": (sd.sample_pc(f_vp, vp, shape, steps=8, corrector=None), 8, None),
        # corrector only: Langevin steps at each of the 9 grid times
        "pc_no_predictor": (sd.sample_pc(f_vp, vp, shape, steps=8, predictor=None, n_corrector_steps=2), 9 * 2, None),
    }
    for name, (sol, nfe, n_states) in runs.items():
        assert sol.nfe == nfe, (name, sol.nfe)
        assert sol.x.shape == shape and bool(torch.isfinite(sol.x).all())
        if n_states is None:
            assert sol.xs is None
        else:
            assert sol.xs.shape == (n_states,) + shape and sol.ts.shape == (n_states,), name
            assert torch.equal(sol.xs[-1], sol.x)
    # DDPM's grid: 12 leading timesteps of 1000 (c = 83: n = 913, ..., 83, 0), then t = 0
    ddpm = runs["ancestral"][0]
    assert ddpm.x.dtype == torch.float32  # a shape draws from the prior in the default dtype
    assert ddpm.ts[0].item() == pytest.approx((11 * 83 + 1) / 1000, rel=1e-7) and ddpm.ts[-1].item() == 0.0
    ald = runs["AnnealedLangevin"][0]
    sigmas = torch.exp(torch.linspace(math.log(15.0), math.log(0.01), 4, dtype=F64))
    assert torch.allclose(ve.marginal(ald.ts.double())[1], sigmas, rtol=1e-6)  # float32 times
    err = capsys.readouterr().err
    for desc in ["ancestral", "ddim", "AnnealedLangevin", "reverse_diffusion"]:
        assert desc in err, (desc, err[-500:])
    # a levels tensor sets the sigmas
    levels = torch.tensor([10.0, 3.0, 1.0, 0.1], dtype=F64)
    sol = sd.sample_ald(f_ve, ve, shape, levels=levels, steps_per_level=2, return_trajectory=True, dtype=F64)
    assert sol.nfe == 8 and torch.allclose(ve.marginal(sol.ts)[1], levels, rtol=1e-12)


def test_same_seed_same_samples():
    vp, ve = sd.VPSDE(), sd.VESDE(sigma_max=15.0)
    f_vp, f_ve = GM.score_fn(vp), GM.score_fn(ve)
    shape = (50, 2)
    runners = [
        lambda g: sd.sample_ddpm(f_vp, vp, shape, steps=20, generator=g),
        lambda g: sd.sample_ddpm(f_vp, vp, shape, steps=20, variance="posterior", generator=g),
        lambda g: sd.sample_ddim(f_vp, vp, shape, steps=20, eta=0.7, generator=g),
        lambda g: sd.sample_ddim(f_vp, vp, shape, steps=20, generator=g),
        lambda g: sd.sample_ald(f_ve, ve, shape, levels=3, steps_per_level=5, generator=g),
        lambda g: sd.sample_pc(f_ve, ve, shape, steps=10, generator=g),
        lambda g: sd.sample_pc(f_vp, vp, shape, steps=10, predictor="ancestral", generator=g),
    ]
    for run in runners:
        a, b, c = run(gen(31)), run(gen(31)), run(gen(32))
        assert torch.equal(a.x, b.x)
        assert not torch.allclose(a.x, c.x)


def test_deterministic_ddim_draws_no_random_numbers():
    vp = sd.VPSDE()
    x = torch.randn(20, 2, generator=gen(33), dtype=F64)
    g = gen(34)
    g_state, global_state = g.get_state(), torch.get_rng_state()
    sd.sample_ddim(GM.score_fn(vp), vp, x, steps=10, generator=g)
    sd.sample_ddim(GM.score_fn(vp), vp, x, steps=10)
    sd.sample_ode(GM.score_fn(vp), vp, x, solver="ddim", steps=10)
    assert torch.equal(g.get_state(), g_state)
    assert torch.equal(torch.get_rng_state(), global_state)
    # ... while eta > 0 does draw (from the generator, not the global RNG)
    sd.sample_ddim(GM.score_fn(vp), vp, x, steps=10, eta=0.5, generator=g)
    assert not torch.equal(g.get_state(), g_state)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_input_validation():
    vp, ve = sd.VPSDE(), sd.VESDE(sigma_max=15.0)
    f_vp, f_ve = GM.score_fn(vp), GM.score_fn(ve)
    x = torch.randn(4, 2, dtype=F64)
    checks = [
        (lambda: sd.sample_ddim(f_vp, vp, x, eta=-0.1), ValueError, r"eta must be in \[0.0, inf\]"),
        (lambda: sd.sample_ddim(f_vp, vp, x, eta=float("nan")), ValueError, "eta must be finite"),
        (lambda: sd.sample_ddpm(f_vp, vp, x, variance="learned"), ValueError,
         r"variance must be one of \('posterior', 'beta'\)"),
        (lambda: sd.sample_ddpm(f_vp, vp, x, clip_x0=0.0), ValueError, r"clip_x0 must be in \(0.0, inf\]"),
        (lambda: sd.sample_ddim(f_vp, vp, x, clip_x0=-1.0), ValueError, r"clip_x0 must be in \(0.0, inf\]"),
        (lambda: sd.sample_ald(f_vp, vp, x), TypeError, "sample_ald needs a VESDE"),
        (lambda: sd.sample_ald(f_ve, ve, x, levels=1), ValueError, "levels must be >= 2"),
        (lambda: sd.sample_ald(f_ve, ve, x, levels=0), ValueError, "levels must be an int >= 1"),
        (lambda: sd.sample_ald(f_ve, ve, x, levels=2.5), TypeError, "levels must be an int"),
        (lambda: sd.sample_ald(f_ve, ve, x, levels=torch.tensor([1.0, 3.0], dtype=F64)), ValueError,
         "strictly decreasing"),
        (lambda: sd.sample_ald(f_ve, ve, x, levels=torch.tensor([30.0, 1.0], dtype=F64)), ValueError,
         "levels must lie in"),
        (lambda: sd.sample_ald(f_ve, ve, x, step_ratio=0.0), ValueError, r"step_ratio must be in \(0.0, inf\]"),
        # (the message names the inner n_steps of the corrector; see the report)
        (lambda: sd.sample_ald(f_ve, ve, x, steps_per_level=0), ValueError, "steps_per_level|n_steps"),
        (lambda: sd.sample_pc(f_vp, vp, x, n_corrector_steps=0), ValueError, "n_corrector_steps|n_steps"),
        (lambda: sd.sample_pc(f_vp, vp, x, predictor=None, corrector=None), ValueError,
         "predictor and corrector cannot both be None"),
        (lambda: sd.sample_pc(f_vp, vp, x, corrector="annealed"), ValueError,
         "corrector must be 'langevin', a Corrector instance or None"),
        (lambda: sd.sample_pc(f_vp, vp, x, predictor="heun"), ValueError, "solver 'heun' is an ODE solver"),
        (lambda: sd.sample_pc(f_vp, vp, x, snr=0.0), ValueError, r"snr must be in \(0.0, inf\]"),
        (lambda: sd.sample_ddpm(f_vp, "vp", x), TypeError, "sde must be an sdediff SDE"),
        (lambda: sd.sample_ddim(None, vp, x), TypeError, "score_fn must be callable"),
    ]
    for call, exc, match in checks:
        with pytest.raises(exc, match=match):
            call()
    # the beta variance is DDPM's (stochasticity 1): the solver refuses another eta
    term = sd.ReverseProcess(vp, f_vp, 0.5).sde_term()
    with pytest.raises(ValueError, match="variance='beta' samples the reverse SDE with stochasticity 1"):
        sd.integrate(term, x, torch.tensor([0.5, 0.4], dtype=F64), solver=Ancestral("beta"))


# --------------------------------------------------------------------------------------------
# 8. Clipping of the predicted x0
# --------------------------------------------------------------------------------------------

FAR = sd.GaussianMixture([1.0], [[3.0, -2.5]], [0.2])  # predicted x0 lies far outside [-1, 1]


def test_ddpm_uses_the_clipped_x0_in_the_posterior_mean():
    betas = ddpm_linear_betas(1000)
    abar = torch.cumprod(1.0 - betas, 0)
    sde = sd.VPSDE.from_betas(betas)
    score_fn = FAR.score_fn(sde)
    steps, clip = 10, 1.0
    ts = sd.discrete_time_grid(sde, steps, spacing="leading")
    x = FAR.diffused(sde, ts[0].item()).sample(16, generator=gen(40))
    zs = torch.randn((steps,) + x.shape, generator=gen(41), dtype=F64)

    def replay():
        it = iter(zs)
        return lambda t0, t1: next(it) * (t1 - t0).abs().sqrt()

    def abar_at(t):  # DDPM's table: timestep n = N t - 1; t = 0 is abar = 1
        n = round(t.item() * 1000) - 1
        return abar[n] if n >= 0 else torch.ones((), dtype=F64)

    for variance in ["beta", "posterior"]:
        sol = sd.sample_ddpm(score_fn, sde, x, steps=steps, variance=variance, clip_x0=clip, brownian=replay(),
                             return_trajectory=True)
        assert torch.equal(sol.ts, ts)
        clipped_somewhere = False
        for i in range(steps):
            xt, t, s = sol.xs[i], ts[i], ts[i + 1]
            abar_t, abar_s = abar_at(t), abar_at(s)
            beta = 1.0 - abar_t / abar_s
            x0 = (xt + (1.0 - abar_t) * FAR.marginal_score(sde, xt, t)) / torch.sqrt(abar_t)
            clipped_somewhere |= bool((x0.abs() > clip).any())
            x0 = x0.clamp(-clip, clip)
            mean = (torch.sqrt(abar_s) * beta / (1.0 - abar_t)) * x0 \
                + (torch.sqrt(1.0 - beta) * (1.0 - abar_s) / (1.0 - abar_t)) * xt
            var = beta if variance == "beta" else (1.0 - abar_s) / (1.0 - abar_t) * beta
            expected = mean if i == steps - 1 else mean + torch.sqrt(var) * zs[i]
            assert (sol.xs[i + 1] - expected).abs().max().item() < 1e-10, (variance, i)
        assert clipped_somewhere
        # the last step returns the clipped x0 itself
        assert bool((sol.x.abs() <= clip).all())
        unclipped = sd.sample_ddpm(score_fn, sde, x, steps=steps, variance=variance, brownian=replay())
        assert (unclipped.x - sol.x).abs().max().item() > 1.0


@pytest.mark.parametrize("eps_from_clipped_x0", [False, True])
def test_ddim_clipping(eps_from_clipped_x0):
    sde = sd.VPSDE()
    score_fn = FAR.score_fn(sde)
    ts = sd.discrete_time_grid(sde, 5)
    x = FAR.diffused(sde, ts[0].item()).sample(16, generator=gen(42))
    sol = sd.sample_ddim(score_fn, sde, x, steps=5, clip_x0=1.0, eps_from_clipped_x0=eps_from_clipped_x0,
                         return_trajectory=True)
    for i in range(5):
        xt, t, s = sol.xs[i], ts[i], ts[i + 1]
        (a_t, s_t), (a_s, s_s) = sde.marginal(t), sde.marginal(s)
        eps = -s_t * FAR.marginal_score(sde, xt, t)
        x0 = ((xt - s_t * eps) / a_t).clamp(-1.0, 1.0)
        if eps_from_clipped_x0:
            eps = (xt - a_t * x0) / s_t
        assert (sol.xs[i + 1] - (a_s * x0 + s_s * eps)).abs().max().item() < 1e-10, i
