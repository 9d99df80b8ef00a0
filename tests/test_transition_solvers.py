"""The transition-based solvers and the Langevin correctors as pieces: formulas, the loop's handling, errors."""

import math

import pytest
import torch

import sdediff as sd
from sdediff.solvers import Ancestral, AnnealedLangevin, LangevinCorrector, ReverseDiffusion

GM = sd.GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0, 0.0], [2.0, 1.0]]), torch.tensor([0.3, 0.5]))


def _state(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64) * 1.5, torch.randn(n, 2, generator=g, dtype=torch.float64)


def test_predict_is_tweedie(sde):
    x, _ = _state()
    t = torch.tensor(0.4, dtype=torch.float64)
    process = sd.ReverseProcess(sde, GM.score_fn(sde))
    x0, eps = process.predict(x, t)
    alpha, sigma = sde.marginal(t)
    # x = alpha x0 + sigma eps holds exactly for the posterior means, and eps = -sigma score.
    assert torch.allclose(alpha * x0 + sigma * eps, x, atol=1e-12, rtol=0)
    assert torch.allclose(eps, -sigma * GM.marginal_score(sde, x, t), atol=1e-12, rtol=0)


@pytest.mark.parametrize("sde_name", ["vp_linear", "ve"])
def test_reverse_diffusion_is_score_sde_predictor(sde_name):
    """VP: x_mean = (2 - sqrt(1 - beta)) x + beta score, std sqrt(beta); VE: x + (s_t^2 - s_s^2) score, std sqrt(s_t^2 - s_s^2)."""
    sde = sd.VPSDE() if sde_name == "vp_linear" else sd.VESDE()
    x, z = _state()
    t0, t1 = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.49, dtype=torch.float64)
    score = GM.marginal_score(sde, x, t0)
    (a0, s0), (a1, s1) = sde.marginal(t0), sde.marginal(t1)
    if sde_name == "ve":
        v, a = s0**2 - s1**2, torch.ones(())
    else:
        a = a0 / a1
        v = 1 - a**2
    expected = (2 - a) * x + v * score + v.sqrt() * z
    term = sd.ReverseProcess(sde, GM.score_fn(sde)).sde_term()
    got = ReverseDiffusion().step(term, x, t0, t1, z * (t0 - t1).sqrt())
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)
    assert torch.allclose(ReverseDiffusion().step(term, x, t0, t1, None), expected - v.sqrt() * z, atol=1e-12, rtol=0)


def test_ancestral_noise_variance_and_mean_formulas():
    sde = sd.VPSDE()
    x, z = _state()
    t0, t1 = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64)
    abar_t, abar_s = (sde.marginal(t)[0] ** 2 for t in (t0, t1))
    beta = 1 - abar_t / abar_s
    post = (1 - abar_s) / (1 - abar_t) * beta
    eps = -(1 - abar_t).sqrt() * GM.marginal_score(sde, x, t0)
    x0 = (x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    dw = z * (t0 - t1).sqrt()
    for eta in (0.0, 0.5, 1.0):
        term = sd.ReverseProcess(sde, GM.score_fn(sde), eta).sde_term()
        expected = abar_s.sqrt() * x0 + (1 - abar_s - eta**2 * post).sqrt() * eps + eta * post.sqrt() * z
        assert torch.allclose(Ancestral().step(term, x, t0, t1, dw), expected, atol=1e-12, rtol=0)
    term = sd.ReverseProcess(sde, GM.score_fn(sde), 1.0).sde_term()
    ddpm = (x - beta / (1 - abar_t).sqrt() * eps) / (1 - beta).sqrt() + beta.sqrt() * z
    assert torch.allclose(Ancestral("beta").step(term, x, t0, t1, dw), ddpm, atol=1e-12, rtol=0)


def test_langevin_step_sizes():
    sde = sd.VESDE(sigma_min=0.01, sigma_max=10.0)
    process = sd.ReverseProcess(sde, GM.score_fn(sde))
    x, z = _state()
    t = torch.tensor(0.5, dtype=torch.float64)
    score = GM.marginal_score(sde, x, t)
    snr = 0.2
    eps = 2 * (snr * z.norm(dim=1).mean() / score.norm(dim=1).mean()) ** 2
    got = LangevinCorrector(snr).step(process, x, t, z)
    assert torch.allclose(got, x + eps * score + (2 * eps).sqrt() * z, atol=1e-12, rtol=0)
    sigma = sde.marginal(t)[1]
    a = 1e-3 * (sigma / 0.01) ** 2
    got = AnnealedLangevin(1e-3, 0.01).step(process, x, t, z)
    assert torch.allclose(got, x + 0.5 * a * score + a.sqrt() * z, atol=1e-12, rtol=0)


def test_langevin_corrector_leaves_the_marginal_invariant():
    """Many small Langevin steps at fixed t started from p_t stay at p_t (mean and weights within sampling error)."""
    sde = sd.VPSDE()
    t = torch.tensor(0.2, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    diffused = GM.diffused(sde, t.item())
    x = diffused.sample(4000, generator=g, dtype=torch.float64)
    ts = torch.tensor([0.2, 0.2 * (1 - 1e-9)], dtype=torch.float64)  # corrector-only run at (essentially) t
    sol = sd.integrate(sd.ReverseProcess(sde, GM.score_fn(sde)).sde_term(), x, ts, solver=None,
                       corrector=LangevinCorrector(snr=0.1, n_steps=100), generator=g)
    assert sol.nfe == 200
    cov = diffused.covariance()
    se = (torch.diagonal(cov) / 4000).sqrt()
    assert ((sol.x.mean(0) - diffused.mean()).abs() < 5 * se).all(), (sol.x.mean(0), diffused.mean())
    # the chain moved: it is not a no-op that passes trivially
    assert (sol.x - x).abs().mean() > 0.1


def test_integrate_corrector_order_and_counts():
    sde = sd.VPSDE()
    x, _ = _state(8)
    ts = sd.time_grid(sde, 5)
    calls = []

    def score_fn(x_, t):
        calls.append(float(t[0]))
        return GM.score_fn(sde)(x_, t)

    term = sd.ReverseProcess(sde, score_fn).sde_term()
    sol = sd.integrate(term, x, ts, solver="euler_maruyama", corrector=LangevinCorrector(n_steps=2),
                       generator=torch.Generator().manual_seed(0))
    assert sol.nfe == 5 * 3 == len(calls)
    # score_sde's order: at each grid time the corrector's two calls, then the predictor's one, all at ts[i]
    assert calls == pytest.approx([float(t) for t in ts[:-1] for _ in range(3)])
    traj = sd.integrate(term, x, ts, solver=None, corrector=LangevinCorrector(), return_trajectory=True)
    assert traj.nfe == 6 and traj.xs.shape == (6, 8, 2)


def test_integrate_rejects_bad_combinations():
    sde = sd.VPSDE()
    x, _ = _state(4)
    ts = sd.time_grid(sde, 3)
    process = sd.ReverseProcess(sde, GM.score_fn(sde))
    bare = sd.ODETerm(process.drift)
    with pytest.raises(TypeError, match="'ddim' steps a diffusion's reverse process"):
        sd.integrate(bare, x, ts, solver="ddim")
    with pytest.raises(ValueError, match="give a solver, a corrector, or both"):
        sd.integrate(process.sde_term(), x, ts, solver=None)
    with pytest.raises(TypeError, match="corrector must be a sdediff Corrector"):
        sd.integrate(process.sde_term(), x, ts, solver="euler_maruyama", corrector="langevin")
    with pytest.raises(TypeError, match="a corrector needs the score"):
        sd.integrate(sd.SDETerm(process.drift, lambda x_, t: process.diffusion(t)), x, ts, solver="euler_maruyama",
                     corrector=LangevinCorrector())
    with pytest.raises(ValueError, match="cannot be combined with a corrector"):
        sd.integrate(process.ode_term(), x, ts, solver="dopri5", corrector=LangevinCorrector())
    with pytest.raises(ValueError, match="variance='beta' samples the reverse SDE with stochasticity 1"):
        sd.sample_sde(GM.score_fn(sde), sde, x, steps=3, solver=Ancestral("beta"), stochasticity=0.5)
    with pytest.raises(ValueError, match="variance must be one of"):
        Ancestral("large")
    with pytest.raises(ValueError, match="clip_x0"):
        Ancestral(clip_x0=0.0)
    with pytest.raises(ValueError, match="snr"):
        LangevinCorrector(snr=-1.0)
    with pytest.raises(ValueError, match="n_steps"):
        LangevinCorrector(n_steps=0)


def test_nonfinite_in_corrector_names_the_time():
    sde = sd.VESDE()
    x, _ = _state(4)

    def bad_score(x_, t):
        return torch.where(t[:, None] < 0.5, torch.full_like(x_, math.inf), -x_)

    with pytest.raises(sd.NonFiniteError, match=r"after the corrector steps at t = 0\.2703.*score_fn returned non-finite"):
        sd.sample_ald(bad_score, sde, x, levels=torch.tensor([50.0, 1.0, 0.1, 0.01]), steps_per_level=2)
    with pytest.raises(sd.NonFiniteError, match=r"after step 4 \(t = 0\.36 -> 0\.2\)"):
        sd.sample_pc(bad_score, sde, x, steps=5, t_end=0.2)


def test_available_solvers_flags_process_solvers():
    info = sd.available_solvers()
    assert info["ddim"].needs_process and info["ancestral"].needs_process and info["reverse_diffusion"].needs_process
    assert not info["heun"].needs_process and not info["euler_maruyama"].needs_process
    assert (info["ddim"].kind, info["ddim"].order) == ("ode", 1)
