"""Noise schedules and the link between continuous-time VP SDEs and discrete DDPM schedules."""

import math

import numpy as np
import pytest
import torch

from sdediff import CosineSchedule, DiscreteSchedule, LinearSchedule, SubVPSDE, VPSDE

F64 = torch.float64


def _t(values):
    return torch.as_tensor(values, dtype=F64)


# ---------------------------------------------------------------------------------------------
# Schedule primitives: beta = -2 d log(alpha)/dt and t_from_log_alpha inverts log_alpha
# ---------------------------------------------------------------------------------------------

SCHEDULES = {
    "linear": lambda: LinearSchedule(),
    "linear_b0_zero": lambda: LinearSchedule(beta_min=0.0, beta_max=5.0),
    "cosine": lambda: CosineSchedule(),
    "cosine_custom": lambda: CosineSchedule(s=0.02, T=0.9),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_beta_is_minus_twice_dlogalpha_dt(name):
    sched = SCHEDULES[name]()
    t = torch.linspace(0.0, sched.T, 57, dtype=F64).requires_grad_(True)
    (dlog,) = torch.autograd.grad(sched.log_alpha(t).sum(), t)
    torch.testing.assert_close(sched.beta(t.detach()), -2.0 * dlog, rtol=1e-12, atol=1e-14)
    assert sched.log_alpha(_t(0.0)).item() == 0.0


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_t_from_log_alpha_inverts(name):
    sched = SCHEDULES[name]()
    t = torch.cat([sched.T * torch.logspace(-3, -1, 9, dtype=F64), torch.linspace(0.1, sched.T, 50, dtype=F64)])
    torch.testing.assert_close(sched.t_from_log_alpha(sched.log_alpha(t)), t, rtol=1e-10, atol=0)


def test_discrete_schedule_log_alpha_is_piecewise_linear_through_knots(ddpm_betas):
    sched = DiscreteSchedule(ddpm_betas)
    N = len(ddpm_betas)
    log_abar = np.cumsum(np.log1p(-ddpm_betas.numpy()))  # independent: numpy
    knots = _t(np.arange(1, N + 1) / N)
    np.testing.assert_allclose(sched.log_alpha(knots).numpy(), 0.5 * log_abar, rtol=1e-13)
    # halfway between knots: the mean of the neighbours (linear in t)
    mid = _t((np.arange(1, N + 1) - 0.5) / N)
    expected = 0.5 * (np.concatenate([[0.0], 0.5 * log_abar[:-1]]) + 0.5 * log_abar)
    np.testing.assert_allclose(sched.log_alpha(mid).numpy(), expected, rtol=1e-12)
    # beta on (t_{n-1}, t_n] is the slope -2 (log alpha_n - log alpha_{n-1}) N, including at t_n itself
    np.testing.assert_allclose(sched.beta(mid).numpy(), -N * np.log1p(-ddpm_betas.numpy()), rtol=1e-13)
    on_knots = _t(np.arange(1, N + 1)) / N
    exact = (on_knots * N) == torch.arange(1, N + 1, dtype=F64)  # knots that round-trip exactly
    np.testing.assert_allclose(sched.beta(on_knots)[exact].numpy(),
                               -N * np.log1p(-ddpm_betas.numpy())[exact.numpy()], rtol=1e-13)
    t = torch.linspace(1e-3, 1.0, 77, dtype=F64)
    torch.testing.assert_close(sched.t_from_log_alpha(sched.log_alpha(t)), t, rtol=1e-12, atol=0)


def test_discrete_beta_on_every_float32_timestep_is_its_own_intervals(ddpm_betas):
    """The reverse step from timestep n + 1 (t = (n+1)/N) reads beta_n. In float32, t N lands a
    few ulps above n + 1 for some n (5 of 1000 here), which must not select beta_(n+1)."""
    sched = DiscreteSchedule(ddpm_betas)
    N = len(ddpm_betas)
    knots = torch.arange(1, N + 1, dtype=F64) / N
    expected = (-N * torch.log1p(-ddpm_betas)).to(torch.float32)
    assert bool(((knots.float() * N).ceil() > torch.arange(1, N + 1)).any())  # the case exists
    torch.testing.assert_close(sched.beta(knots.float()), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(sched.beta(knots), expected.double(), rtol=1e-6, atol=0)
    # a half-precision time is already rounded: its own value decides (a tolerance of its ulps,
    # about 31 timesteps near t = 1 in bfloat16, would move it)
    for dtype in (torch.bfloat16, torch.float16):
        t = torch.tensor([0.25, 0.5, 0.7, 0.999], dtype=dtype)
        assert torch.equal(sched.beta(t), sched.beta(t.float()).to(dtype))
        assert torch.equal(sched.beta(t.float()), sched.beta(t.double()).float())


def test_schedule_validation():
    with pytest.raises(ValueError, match="s must be in"):
        CosineSchedule(s=0.0)
    with pytest.raises(ValueError, match="T must be in"):
        CosineSchedule(T=1.0)
    with pytest.raises(ValueError, match="beta_max"):
        LinearSchedule(beta_min=2.0, beta_max=1.0)
    with pytest.raises(ValueError, match="betas"):
        DiscreteSchedule([0.5, 1.5])
    with pytest.raises(ValueError, match="betas"):
        DiscreteSchedule([[0.1, 0.2]])


def test_schedule_instance_is_used_as_is():
    sched = CosineSchedule(s=0.02, T=0.9)
    for cls in (VPSDE, SubVPSDE):
        sde = cls(schedule=sched)
        assert sde.schedule is sched and sde.T == 0.9


# ---------------------------------------------------------------------------------------------
# 4. Discrete link
# ---------------------------------------------------------------------------------------------

def test_linear_discretize_is_ddpm():
    d = VPSDE().discretize(1000)
    betas = torch.linspace(0.1 / 1000, 20 / 1000, 1000, dtype=F64)
    for v in d:
        assert v.dtype == F64 and v.shape == (1000,)
    # betas come back through 1 - abar_n / abar_{n-1}: a few ulps of 1 (~2e-16) absolute, which
    # is ~4e-13 relative on the smallest beta (1e-4)
    torch.testing.assert_close(d.betas, betas, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(d.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-14, atol=0)
    torch.testing.assert_close(d.alphas, 1 - d.betas, rtol=0, atol=1e-16)
    # other beta ranges and N
    d = VPSDE(beta_min=0.5, beta_max=7.0).discretize(50)
    torch.testing.assert_close(d.betas, torch.linspace(0.5 / 50, 7.0 / 50, 50, dtype=F64), rtol=1e-12, atol=1e-15)


def test_linear_discretize_too_few_steps_is_rejected_or_valid():
    try:
        d = VPSDE().discretize(10)  # beta_max / N = 2
    except ValueError as e:
        assert "N" in str(e)
        return
    assert bool(((d.betas > 0) & (d.betas < 1)).all()), d.betas
    assert bool((d.alphas_cumprod > 0).all())


def _iddpm_cosine(N, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal's betas_for_alpha_bar, written out in numpy."""
    def f(t):
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.array([min(1 - f((i + 1) / N) / f(i / N), max_beta) for i in range(N)])
    return betas, np.cumprod(1 - betas)


@pytest.mark.parametrize("N", [1000, 100])
def test_cosine_discretize_is_iddpm(N):
    d = VPSDE(schedule="cosine").discretize(N)
    betas, abar = _iddpm_cosine(N)
    assert betas[-1] == 0.999  # the clip is exercised
    # cos^2 near pi/2 carries ~1e-13 relative rounding in either implementation
    np.testing.assert_allclose(d.betas.numpy(), betas, rtol=1e-10)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), abar, rtol=1e-10)
    np.testing.assert_allclose(d.alphas.numpy(), 1 - betas, rtol=1e-10)


def test_from_betas_matches_alphas_cumprod(ddpm_betas):
    sde = VPSDE.from_betas(ddpm_betas)
    N = len(ddpm_betas)
    abar = np.cumprod(1 - ddpm_betas.numpy())
    alpha, sigma = sde.marginal(_t(np.arange(1, N + 1) / N))
    np.testing.assert_allclose(alpha.numpy() ** 2, abar, rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy() ** 2, 1 - abar, rtol=1e-12)
    assert sde.T == 1.0 and sde.marginal(_t(0.0))[0].item() == 1.0

    d = sde.discretize(N)
    torch.testing.assert_close(d.betas, ddpm_betas, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), abar, rtol=1e-14)
    # a coarser discretization lands on every other knot
    d2 = sde.discretize(N // 2)
    np.testing.assert_allclose(d2.alphas_cumprod.numpy(), abar[1::2], rtol=1e-12)
    # ... and from_alphas_cumprod is the same process
    sde2 = VPSDE.from_alphas_cumprod(torch.from_numpy(abar))
    t = torch.linspace(0, 1, 333, dtype=F64)
    torch.testing.assert_close(sde2.marginal(t)[0], sde.marginal(t)[0], rtol=1e-12, atol=0)


def test_from_betas_discretize_round_trips_bit_exactly(ddpm_betas):
    assert torch.equal(VPSDE.from_betas(ddpm_betas).discretize(len(ddpm_betas)).betas, ddpm_betas)


def test_continuous_linear_vp_is_limit_of_ddpm():
    """from_betas(linear DDPM betas) converges to the continuous linear VPSDE at rate 1/N.

    -2 log alpha sums -log(1 - b_k) = b_k + b_k^2/2 + ... over b_k = beta/N, while the continuous
    process integrates beta. The first-order sums match the integral up to the linspace's knot
    offset, at most (beta_max - beta_min)/(8N); the second-order term adds int beta^2 dt/(2N).
    Halved for log alpha, with 10% for higher orders:
        |log alpha_N - log alpha| <= 1.1 (int_0^1 beta^2/4 + (beta_max - beta_min)/16) / N.
    """
    b0, b1 = 0.1, 20.0
    cont = VPSDE(beta_min=b0, beta_max=b1)
    int_beta2 = (b1**3 - b0**3) / (3 * (b1 - b0))
    t = torch.linspace(0.0, 1.0, 1001, dtype=F64)
    errs = {}
    for N in (1000, 4000):
        disc = VPSDE.from_betas(torch.linspace(b0 / N, b1 / N, N, dtype=F64))
        err = (torch.log(disc.marginal(t)[0]) - torch.log(cont.marginal(t)[0])).abs().max().item()
        assert err <= 1.1 * (int_beta2 / 4 + (b1 - b0) / 16) / N, (N, err)
        errs[N] = err
    assert errs[1000] > 0.02  # not trivially equal: the discrepancy is real at N = 1000
    assert 3.8 < errs[1000] / errs[4000] < 4.2  # first order in 1/N
    # alpha itself: within 1e-3 absolute everywhere at N = 1000 (alpha <= 1 and |d log alpha| < 0.034)
    disc = VPSDE.from_betas(torch.linspace(b0 / 1000, b1 / 1000, 1000, dtype=F64))
    torch.testing.assert_close(disc.marginal(t)[0], cont.marginal(t)[0], rtol=0, atol=1e-3)


def test_t_from_log_snr_at_time_zero_with_zero_beta_min():
    sde = VPSDE(beta_min=0.0, beta_max=5.0)
    lam0 = sde.log_snr(_t(0.0))
    assert lam0.item() == math.inf
    assert sde.t_from_log_snr(lam0).item() == 0.0


def test_t_from_log_snr_at_time_zero():
    for sde in (VPSDE(), SubVPSDE(), VPSDE(schedule="cosine")):
        lam0 = sde.log_snr(_t(0.0))
        assert lam0.item() == math.inf
        assert sde.t_from_log_snr(lam0).item() == 0.0
