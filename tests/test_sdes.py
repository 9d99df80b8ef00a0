"""Forward SDEs: marginals against the SDE itself, closed forms, log-SNR inverse, API shapes, priors, validation."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from sdediff import EDMSDE, SubVPSDE, VESDE, VPSDE
from sdediff.schedules import DiscreteSchedule

F64 = torch.float64


def _t(values):
    return torch.as_tensor(values, dtype=F64)


# ---------------------------------------------------------------------------------------------
# 1. The marginal coefficients solve the moment ODEs of the SDE
# ---------------------------------------------------------------------------------------------

def _piece_propagators(sde, edges, u_checks):
    """Integrate the moment ODEs m' = f m, v' = 2 f v + g^2 over every piece [e_n, e_{n+1}] at once.

    Linearity makes each piece a propagator: started from (m, v) at e_n, the solution at
    e_n + u h_n is (m Phi, v Phi^2 + q) where Phi' = f Phi, q' = 2 f q + g^2, Phi = 1, q = 0 at
    u = 0. All pieces are integrated together in the local time u in [0, 1] with scipy's DOP853
    (rtol 1e-12); f = f(t) is read off the public drift f(t) x at x = 1 and g^2 off the public
    diffusion. The right-hand side is evaluated strictly inside each piece, so a discrete
    schedule's knot never picks up the neighbouring piece's beta (a shift of 1e-10 h_n in t).
    Returns Phi and q of shape (len(u_checks), n_pieces).
    """
    lo = torch.as_tensor(edges[:-1], dtype=F64)
    h = torch.as_tensor(np.diff(edges), dtype=F64)
    P = len(h)
    ones = torch.ones(P, 1, dtype=F64)

    def rhs(u, y):
        t = lo + h * min(max(u, 1e-10), 1 - 1e-10)
        f = sde.drift(ones, t)[:, 0]
        g2 = sde.diffusion(t) ** 2
        phi, q = torch.from_numpy(y[:P]), torch.from_numpy(y[P:])
        return torch.cat([h * f * phi, h * (2 * f * q + g2)]).numpy()

    y0 = np.concatenate([np.ones(P), np.zeros(P)])
    sol = solve_ivp(rhs, (0.0, 1.0), y0, method="DOP853", rtol=1e-12, atol=1e-20, t_eval=u_checks)
    assert sol.success, sol.message
    return sol.y[:P].T, sol.y[P:].T


def test_marginal_solves_moment_odes(sde):
    T = sde.T
    if isinstance(sde, VESDE):
        m0, v0 = 1.0, sde.sigma_min**2  # VE's time 0 carries sigma_min noise by convention
    else:
        m0, v0 = 1.0, 0.0
    alpha0, sigma0 = sde.marginal(_t(0.0))
    assert alpha0.item() == pytest.approx(m0, abs=1e-15)
    assert sigma0.item() ** 2 == pytest.approx(v0, abs=1e-15)

    if isinstance(getattr(sde, "schedule", None), DiscreteSchedule):
        edges = np.arange(sde.schedule.N + 1) / sde.schedule.N  # beta is constant between knots
    else:
        edges = np.concatenate([[0.0], T * np.logspace(-5, 0, 60)])
    u_checks = [0.37, 1.0]
    phi, q = _piece_propagators(sde, edges, u_checks)
    # chain the pieces: (m, v) at the start of each piece, then at the check points inside it
    m_start, v_start = [m0], [v0]
    for n in range(len(edges) - 1):
        m_start.append(m_start[-1] * phi[-1, n])
        v_start.append(v_start[-1] * phi[-1, n] ** 2 + q[-1, n])
    m_start, v_start = np.array(m_start[:-1]), np.array(v_start[:-1])
    ts = np.concatenate([edges[:-1] + u * np.diff(edges) for u in u_checks])
    m = np.concatenate([m_start * phi[i] for i in range(len(u_checks))])
    v = np.concatenate([v_start * phi[i] ** 2 + q[i] for i in range(len(u_checks))])

    alpha, sigma = sde.marginal(_t(ts))
    # The integrator's rtol is 1e-12 per step; 1e-9 leaves room for its accumulation over the
    # pieces while failing on any real mismatch (a wrong factor anywhere is >> 1e-9).
    np.testing.assert_allclose(alpha.numpy(), m, rtol=1e-9, atol=0)
    np.testing.assert_allclose(sigma.numpy() ** 2, v, rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------
# 2. log-SNR and its inverse
# ---------------------------------------------------------------------------------------------

def test_t_from_log_snr_inverts_log_snr(sde):
    t = torch.cat([sde.T * torch.logspace(-3, -1, 20, dtype=F64), torch.linspace(0.1, sde.T, 200, dtype=F64)])
    back = sde.t_from_log_snr(sde.log_snr(t))
    assert back.dtype == F64
    torch.testing.assert_close(back, t, rtol=1e-10, atol=0)
    # the end point maps back into [0, T]
    assert sde.t_from_log_snr(sde.log_snr(_t(sde.T))).item() == pytest.approx(sde.T, rel=1e-12)


def test_t_from_log_snr_accurate_at_small_t(sde, sde_name, request):
    t = torch.logspace(-7, -3, 30, dtype=F64).requires_grad_(True)
    lam = sde.log_snr(t)
    (dlam_dt,) = torch.autograd.grad(lam.sum(), t)
    t, lam = t.detach(), lam.detach()
    back = sde.t_from_log_snr(lam)
    # The inverse can do no better than lam's own rounding (a few ulps of |lam|) propagated
    # through dt/dlam; allow 8 ulps of that plus 1e-10 relative.
    inherent = 8 * torch.finfo(F64).eps * lam.abs() / dlam_dt.abs()
    err = (back - t).abs()
    assert bool((err <= 1e-10 * t + inherent).all()), (err / t).max().item()


def test_log_snr_strictly_decreasing(sde):
    t = torch.cat([torch.zeros(1, dtype=F64), sde.T * torch.logspace(-8, 0, 2001, dtype=F64)])
    lam = sde.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all())
    if isinstance(sde, VESDE):
        assert lam[0].item() == pytest.approx(-2 * math.log(sde.sigma_min), rel=1e-14)
    else:
        assert lam[0].item() == math.inf  # sigma(0) = 0
    # log_snr = 2 log(alpha / sigma) from the public marginal
    alpha, sigma = sde.marginal(t[1:])
    torch.testing.assert_close(lam[1:], 2 * torch.log(alpha / sigma), rtol=1e-12, atol=1e-12)


def test_t_from_log_snr_rejects_out_of_range(sde):
    lam_T = sde.log_snr(_t(sde.T)).item()
    with pytest.raises(ValueError, match="lam"):
        sde.t_from_log_snr(_t(lam_T - 1.0))
    with pytest.raises(ValueError, match="lam"):
        sde.t_from_log_snr(_t([lam_T + 1.0, lam_T - 1.0]))
    with pytest.raises(ValueError, match="lam"):
        sde.t_from_log_snr(_t(float("nan")))
    with pytest.raises(ValueError, match="lam"):
        sde.t_from_log_snr(lam_T - 1.0)  # Python float path
    with pytest.raises(TypeError, match="lam"):
        sde.t_from_log_snr(torch.tensor([1, 2]))
    lam_0 = sde.log_snr(_t(0.0)).item()
    if math.isfinite(lam_0):  # VE: log_snr(0) = -2 log sigma_min is an upper bound
        with pytest.raises(ValueError, match="lam"):
            sde.t_from_log_snr(_t(lam_0 + 1.0))


# ---------------------------------------------------------------------------------------------
# 3. Closed forms
# ---------------------------------------------------------------------------------------------

T_GRID = np.concatenate([[0.0], np.logspace(-4, -1, 10), np.linspace(0.1, 1.0, 19)])


@pytest.mark.parametrize("b0,b1", [(0.1, 20.0), (0.5, 7.0), (0.0, 3.0)])
def test_vp_linear_closed_form(b0, b1):
    sde = VPSDE(beta_min=b0, beta_max=b1)
    t = T_GRID
    log_alpha = -t**2 * (b1 - b0) / 4 - t * b0 / 2
    alpha, sigma = sde.marginal(_t(t))
    np.testing.assert_allclose(alpha.numpy(), np.exp(log_alpha), rtol=1e-14)
    np.testing.assert_allclose(sigma.numpy(), np.sqrt(-np.expm1(2 * log_alpha)), rtol=1e-13)
    beta = b0 + t * (b1 - b0)
    np.testing.assert_allclose(sde.diffusion(_t(t)).numpy() ** 2, beta, rtol=1e-14)
    x = torch.ones(len(t), 1, dtype=F64)
    np.testing.assert_allclose(sde.drift(x, _t(t))[:, 0].numpy(), -beta / 2, rtol=1e-14)


def _cosine_f(t, s=0.008):
    return np.cos(np.pi / 2 * (t + s) / (1 + s)) ** 2


@pytest.mark.parametrize("cls", [VPSDE, SubVPSDE])
def test_cosine_closed_form(cls):
    sde = cls(schedule="cosine")
    assert sde.T == 0.9946
    t = np.concatenate([[0.0], np.logspace(-3, -1, 8), np.linspace(0.1, 0.9946, 30)])
    alpha, _ = sde.marginal(_t(t))
    abar = _cosine_f(t) / _cosine_f(0.0)
    np.testing.assert_allclose(alpha.numpy() ** 2, abar, rtol=1e-12)
    # beta = -d/dt log alpha^2: autograd through the plain cos^2 formula, written out here
    tt = _t(t).requires_grad_(True)
    log_f = 2 * torch.log(torch.cos(math.pi / 2 * (tt + 0.008) / 1.008))
    (dlogf,) = torch.autograd.grad(log_f.sum(), tt)
    beta = VPSDE(schedule="cosine").diffusion(_t(t)).numpy() ** 2
    np.testing.assert_allclose(beta, -dlogf.numpy(), rtol=1e-12)
    # the docstring's end-point figures: beta(T) ~ 370, log-SNR(T) ~ -9.5 for VP
    if cls is VPSDE:
        assert beta[-1] == pytest.approx(370, rel=0.01)
        assert sde.log_snr(_t(sde.T)).item() == pytest.approx(-9.5, abs=0.1)
    with pytest.raises(ValueError, match="t"):
        sde.marginal(0.999)  # beyond T


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_subvp_closed_form(schedule):
    sub, vp = SubVPSDE(schedule=schedule), VPSDE(schedule=schedule)
    assert sub.T == vp.T
    t = _t(np.linspace(0.0, sub.T, 41))
    a_sub, s_sub = sub.marginal(t)
    a_vp, s_vp = vp.marginal(t)
    torch.testing.assert_close(a_sub, a_vp, rtol=0, atol=0)
    torch.testing.assert_close(s_sub, 1 - a_sub**2, rtol=1e-13, atol=1e-16)
    assert bool((s_sub <= s_vp + 1e-15).all())  # "sub"-VP: never more noise than VP
    beta = vp.diffusion(t) ** 2
    torch.testing.assert_close(sub.diffusion(t) ** 2, beta * (1 - a_sub**4), rtol=1e-12, atol=1e-15)
    x = torch.ones(len(t), 2, dtype=F64)
    torch.testing.assert_close(sub.drift(x, t), vp.drift(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("smin,smax", [(0.01, 50.0), (0.002, 80.0), (0.5, 1.5)])
def test_ve_closed_form(smin, smax):
    sde = VESDE(sigma_min=smin, sigma_max=smax)
    assert sde.prior_std == smax and sde.T == 1.0
    t = _t(T_GRID).requires_grad_(True)
    sigma_ref = smin * (smax / smin) ** t
    (dvar_dt,) = torch.autograd.grad((sigma_ref**2).sum(), t)  # g^2 = d sigma^2 / dt (alpha = 1)
    t = t.detach()
    alpha, sigma = sde.marginal(t)
    torch.testing.assert_close(alpha, torch.ones_like(t), rtol=0, atol=0)
    torch.testing.assert_close(sigma, sigma_ref.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(sde.diffusion(t) ** 2, dvar_dt, rtol=1e-12, atol=0)
    x = torch.randn(len(t), 3, dtype=F64)
    assert bool((sde.drift(x, t) == 0).all())


def test_discrete_vp_diffusion_is_piecewise_constant(ddpm_betas):
    """g^2 on (t_{n-1}, t_n] is -N log(1 - beta_n): the rate that reproduces alphas_cumprod exactly."""
    sde = VPSDE.from_betas(ddpm_betas)
    N = len(ddpm_betas)
    n = torch.arange(1, N + 1, dtype=F64)
    for frac in (0.1, 0.5, 0.9):
        g2 = sde.diffusion((n - 1 + frac) / N) ** 2
        torch.testing.assert_close(g2, -N * torch.log1p(-ddpm_betas), rtol=1e-13, atol=0)


# --- API shapes, values and dtypes -------------------------------------------------------------

B = 5


def _time_arg(kind, dtype, T):
    # off the discrete schedule's knots n/1000, where beta jumps and float32 rounding of t could pick
    # either side
    values = T * torch.tensor([0.0, 0.1234, 0.4321, 0.8765, 1.0], dtype=F64)
    if kind == "float":
        return 0.3217 * T, torch.full((B,), 0.3217 * T, dtype=F64)
    if kind == "0d":
        return torch.tensor(0.3217 * T, dtype=dtype), torch.full((B,), 0.3217 * T, dtype=dtype).to(F64)
    if kind == "len1":
        return torch.tensor([0.6543 * T], dtype=dtype), torch.full((B,), 0.6543 * T, dtype=dtype).to(F64)
    return values.to(dtype), values.to(dtype).to(F64)


@pytest.mark.parametrize("kind", ["float", "0d", "len1", "batch"])
@pytest.mark.parametrize("x_dtype,t_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_api_shapes_values_dtypes(sde, kind, x_dtype, t_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, 4, 4, generator=g, dtype=x_dtype)
    noise = torch.randn(B, 3, 4, 4, generator=g, dtype=x_dtype)
    t, t_per_sample = _time_arg(kind, t_dtype, sde.T)
    # per-sample scalar references, one sample at a time in float64, at t as the SDE sees it:
    # rounded to x's dtype when there is an x, to t's own dtype when there is none
    t_x = t_per_sample.to(x_dtype).to(F64)
    a_ref, s_ref = (torch.stack(c) for c in zip(*(sde.marginal(ti) for ti in t_x)))
    f_ref = torch.stack([sde.drift(torch.ones(1, 1, dtype=F64), ti)[0, 0] for ti in t_x])
    g_ref = torch.stack([sde.diffusion(ti) for ti in t_per_sample])
    view = (B, 1, 1, 1)
    # float32: the cosine beta ~ tan(angle) near T has condition number ~ 200, hence 2e-5
    rtol, atol = (2e-5, 1e-5) if x_dtype == torch.float32 else (1e-12, 1e-14)

    drift = sde.drift(x, t)
    assert drift.shape == x.shape and drift.dtype == x_dtype
    torch.testing.assert_close(drift.to(F64), f_ref.view(view) * x.to(F64), rtol=rtol, atol=atol)

    mean, std = sde.marginal_prob(x, t)
    assert mean.shape == x.shape and mean.dtype == x_dtype and std.dtype == x_dtype
    t_shape = () if kind in ("float", "0d") else tuple(t.shape)
    assert std.shape == t_shape
    torch.testing.assert_close(mean.to(F64), a_ref.view(view) * x.to(F64), rtol=rtol, atol=atol)
    torch.testing.assert_close(std.expand(B).to(F64), s_ref, rtol=rtol, atol=atol)

    xt = sde.perturb(x, t, noise)
    assert xt.shape == x.shape and xt.dtype == x_dtype
    ref = a_ref.view(view) * x.to(F64) + s_ref.view(view) * noise.to(F64)
    torch.testing.assert_close(xt.to(F64), ref, rtol=rtol, atol=atol)

    # no x: results take t's dtype (a Python float gives float64)
    alpha, sigma = sde.marginal(t)
    diff = sde.diffusion(t)
    t_dtype_out = torch.float64 if kind == "float" else t_dtype
    for out in (alpha, sigma, diff):
        assert out.shape == t_shape and out.dtype == t_dtype_out
    rtol, atol = (2e-5, 1e-5) if diff.dtype == torch.float32 else (1e-12, 1e-14)
    torch.testing.assert_close(diff.expand(B).to(F64), g_ref, rtol=rtol, atol=atol)


def test_perturb_rejects_bad_noise(sde):
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="noise"):
        sde.perturb(x, 0.5 * sde.T, torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="noise"):
        sde.perturb(x, 0.5 * sde.T, np.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------
# 5. Prior
# ---------------------------------------------------------------------------------------------

def test_prior_logp_matches_torch_normal(sde):
    expected_std = sde.sigma_max if isinstance(sde, (VESDE, EDMSDE)) else 1.0
    assert sde.prior_std == expected_std
    z = sde.prior_std * torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = torch.distributions.Normal(_t(0.0), _t(sde.prior_std)).log_prob(z).sum((1, 2))
    torch.testing.assert_close(sde.prior_logp(z), ref, rtol=1e-13, atol=1e-12)
    assert sde.prior_logp(z).shape == (4,)


def test_prior_sample(sde):
    shape = (4000, 2, 4)
    z = sde.prior_sample(shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert z.shape == shape and z.dtype == F64
    n = z.numel()
    # sample std of n Gaussian draws has standard error std / sqrt(2n); allow 5 of them
    assert z.std().item() == pytest.approx(sde.prior_std, abs=5 * sde.prior_std / math.sqrt(2 * n))
    assert abs(z.mean().item()) < 5 * sde.prior_std / math.sqrt(n)
    again = sde.prior_sample(shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert torch.equal(z, again)
    other = sde.prior_sample(shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert not torch.equal(z, other)
    with pytest.raises(ValueError, match="shape"):
        sde.prior_sample((0, 3))
    with pytest.raises(ValueError, match="shape"):
        sde.prior_sample((2, 1.5))


# ---------------------------------------------------------------------------------------------
# 6. Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: VPSDE(beta_min=-1), ValueError, "beta_min"),
        (lambda: VPSDE(beta_max=0.05, beta_min=0.1), ValueError, "beta_max"),
        (lambda: VPSDE(beta_max=0.0, beta_min=0.0), ValueError, "beta_max"),
        (lambda: VPSDE(beta_min=float("nan")), ValueError, "beta_min"),
        (lambda: VPSDE(beta_min="0.1"), TypeError, "beta_min"),
        (lambda: VPSDE(schedule="foo"), ValueError, "schedule"),
        (lambda: SubVPSDE(schedule="foo"), ValueError, "schedule"),
        (lambda: SubVPSDE(beta_min=-1), ValueError, "beta_min"),
        (lambda: VESDE(sigma_min=0), ValueError, "sigma_min"),
        (lambda: VESDE(sigma_min=5, sigma_max=1), ValueError, "sigma_max"),
        (lambda: VESDE(sigma_min=1, sigma_max=1), ValueError, "sigma_max"),
        (lambda: VESDE(sigma_max=float("inf")), ValueError, "sigma_max"),
        (lambda: VPSDE.from_betas(torch.tensor([0.1, 1.0])), ValueError, "betas"),
        (lambda: VPSDE.from_betas(torch.tensor([0.1, 0.0])), ValueError, "betas"),
        (lambda: VPSDE.from_betas(torch.zeros(2, 2) + 0.1), ValueError, "betas"),
        (lambda: VPSDE.from_betas(torch.zeros(0)), ValueError, "betas"),
    ],
)
def test_constructor_validation(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_time_validation(sde):
    x = torch.zeros(4, 3, dtype=F64)
    bad_times = [1.5 * sde.T, -0.1, sde.T * (1 + 1e-6), float("nan"), torch.tensor([0.5, float("nan")]),
                 torch.tensor([0.5, -1e-3]), torch.tensor(2.0 * sde.T)]
    for bad in bad_times:
        with pytest.raises(ValueError, match="t must lie in|t must be in|t must be finite"):
            sde.marginal(bad)
        with pytest.raises(ValueError, match="^t "):
            sde.drift(x, bad)
    with pytest.raises(TypeError, match="t"):
        sde.marginal("0.5")
    with pytest.raises(TypeError, match="t must have a floating-point dtype"):
        sde.marginal(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="t has shape"):
        sde.drift(x, torch.full((3,), 0.5 * sde.T))  # batch of 4
    with pytest.raises(ValueError, match="^t must be a float"):
        sde.drift(x, torch.full((4, 1), 0.5 * sde.T))
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        sde.drift(torch.zeros(4, 3, dtype=torch.int64), 0.5 * sde.T)
    with pytest.raises(TypeError, match="x0"):
        sde.marginal_prob(torch.zeros(4, 3, dtype=torch.int32), 0.5 * sde.T)
    with pytest.raises(ValueError, match="x"):
        sde.drift(torch.zeros(0, 3, dtype=F64), 0.5 * sde.T)
    with pytest.raises(TypeError, match="x"):
        sde.drift(np.zeros((4, 3)), 0.5 * sde.T)
    with pytest.raises(TypeError, match="z"):
        sde.prior_logp(torch.zeros(4, 3, dtype=torch.int64))
    # the end points themselves are valid
    sde.marginal(0.0)
    sde.marginal(sde.T)


@pytest.mark.parametrize("stochasticity", [0.0, 0.5, 1.0])
def test_reverse_drift_is_f_x_minus_weighted_g2_score(sde, stochasticity):
    """``drift = f(t) x - (1 + s^2)/2 g(t)^2 score`` against the public f and g, for a 0-d time and
    per-sample times, on image-shaped states (the drift fuses this into one addcmul and skips
    f x where the SDE has no drift)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=F64)
    weights = torch.randn(4, 2, 3, 3, generator=g, dtype=F64)

    def score_fn(y, t):  # depends on t per sample, so a mixed-up broadcast shows
        return weights * y + t.reshape(-1, 1, 1, 1)

    process = sde.reverse(score_fn, stochasticity)
    for t in (_t(0.3 * sde.T), torch.linspace(0.1, 0.9, 4, dtype=F64) * sde.T):
        t_b = t.expand(4) if t.dim() == 0 else t
        f = sde.drift(torch.ones(4, 1, dtype=F64), t_b)[:, 0].reshape(-1, 1, 1, 1)  # f(t) = drift at x = 1
        g2 = sde.diffusion(t_b).reshape(-1, 1, 1, 1) ** 2
        expected = f * x - 0.5 * (1.0 + stochasticity**2) * g2 * score_fn(x, t_b)
        torch.testing.assert_close(process.drift(x, t), expected, rtol=1e-13, atol=1e-13)


def test_reverse_drift_follows_a_subclass_that_redefines_f_or_g2():
    """The VP and sub-VP processes fuse f and g^2 into one evaluation; a subclass that redefines
    only one of them must still be sampled with its own (fails if the parent's shortcut is kept)."""

    class DoubleNoiseVP(VPSDE):
        def _g2(self, t):
            return 2.0 * self.schedule.beta(t)

    class NoDriftSubVP(SubVPSDE):
        def _drift_coef(self, t):
            return torch.zeros_like(t)

    class DoubleNoise:
        def _g2(self, t):
            return 2.0 * self.schedule.beta(t)

    class MixedInVP(DoubleNoise, VPSDE):  # the mixin's g^2 precedes VPSDE's fused pair in the MRO
        pass

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    t = _t(0.4)
    assert MixedInVP()._g2(t) == DoubleNoiseVP()._g2(t)
    for sde in (DoubleNoiseVP(), NoDriftSubVP(), MixedInVP()):
        f, g2 = sde._drift_coef(t), sde._g2(t)
        expected = f * x - 0.5 * g2 * (-x)
        torch.testing.assert_close(sde.reverse(lambda y, s: -y, 0.0).drift(x, t), expected, rtol=1e-14, atol=0)


def test_reverse_drift_takes_the_wider_of_the_state_and_score_dtypes(sde):
    """A half-precision score (an autocast network) with a float32 state gives a float32 drift on
    every SDE, with or without an ``f x`` term, so the solver adds it to x without another rounding."""
    x = torch.randn(4, 3)
    drift = sde.reverse(lambda y, t: y.to(torch.bfloat16), 0.0).drift(x, torch.tensor(0.3 * sde.T))
    assert drift.dtype == torch.float32
