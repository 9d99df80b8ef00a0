"""Training losses: denoising score matching (every weighting and parameterization, importance
sampling) against closed forms on the Gaussian test bed, and sliced score matching.

Monte Carlo checks compare against closed forms within Z standard errors (fixed seeds), mostly
through common random numbers: the generator draws are reproduced by hand (`_draws`), so
differences cancel the noise that the compared quantities share.
"""

import math

import pytest
import torch

from sdediff import GaussianMixture, SubVPSDE, VESDE, VPSDE
from sdediff.losses import dsm_loss, ssm_loss
from sdediff.sdes import bcast


F64 = torch.float64
T_MIN = 1e-5
Z = 4.0  # standard errors allowed in the Monte Carlo comparisons


def mixture():
    return GaussianMixture([0.3, 0.5, 0.2], [[-1.0, 0.5], [1.0, 1.0], [0.5, -1.5]], [0.3, 0.2, 0.25])


def gaussian():
    return GaussianMixture([1.0], [[0.5, -1.0]], [[0.3, 0.7]])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _lam_range(sde, t_min=T_MIN):
    hi, lo = sde._log_snr(torch.tensor([t_min, sde.T], dtype=F64)).unbind()
    return hi, lo


def _draws(sde, x0, seed, importance_sampling=False, t_min=T_MIN):
    """(t, eps) exactly as dsm_loss draws them (documented order: u, then eps)."""
    g = _gen(seed)
    u = torch.rand(x0.shape[0], generator=g, dtype=x0.dtype)
    if importance_sampling:
        hi, lo = _lam_range(sde, t_min)
        t = sde._t_from_log_snr(hi - (hi - lo) * u).clamp(t_min, sde.T)
    else:
        t = t_min + (sde.T - t_min) * u
    return t, torch.randn(x0.shape, generator=g, dtype=x0.dtype)


def _within(samples, expected, z=Z):
    mean = samples.mean().item()
    se = samples.std().item() / math.sqrt(samples.numel())
    off = abs(mean - expected)
    assert off <= z * se + 1e-12, f"mean {mean:.6g} vs {expected:.6g}: {off / max(se, 1e-300):.2f} SE"
    return mean, se


def _t_average(sde, f, n=20001, t_min=T_MIN):
    """E_t f(t) for t ~ U[t_min, T] (midpoint rule; f smooth)."""
    t = t_min + (sde.T - t_min) * (torch.arange(n, dtype=F64) + 0.5) / n
    return f(t).mean().item()


def _lam_integral(sde, f, n=200001, t_min=T_MIN):
    """int f(t(l)) dl over [l(T), l(t_min)] (midpoint rule in the log-SNR)."""
    hi, lo = _lam_range(sde, t_min)
    lam = lo + (hi - lo) * (torch.arange(n, dtype=F64) + 0.5) / n
    return (f(sde._t_from_log_snr(lam)).mean() * (hi - lo)).item()


SETTINGS = [("simple", False), ("sigma2", False), ("likelihood", True)]
TWO_SDES = {"vp": VPSDE, "ve": VESDE}


# ---------------------------------------------------------------------------------------------
# the DSM minimum: the exact marginal score
# ---------------------------------------------------------------------------------------------

def _weight_over_sigma2(sde, t, weighting, importance_sampling, d):
    """Factor w with loss = w * ||sigma s + eps||^2 summed over dims."""
    if weighting == "simple":
        return torch.full_like(t, 1.0 / d)
    if weighting == "sigma2":
        return torch.ones_like(t)
    if importance_sampling:
        hi, lo = _lam_range(sde)
        return torch.full_like(t, 0.5 * (hi - lo).item())
    return 0.5 * (sde.T - T_MIN) * sde._g2(t) / sde._alpha_sigma(t)[1] ** 2


@pytest.mark.parametrize("weighting,importance_sampling", SETTINGS)
@pytest.mark.parametrize("sde_key", list(TWO_SDES))
def test_dsm_minimum_single_gaussian_closed_form(sde_key, weighting, importance_sampling):
    # x0 ~ N(m, diag s^2): min_s E||s - grad log p(x_t|x0)||^2 = d/sigma^2 - sum 1/(alpha^2 s_i^2 + sigma^2),
    # i.e. sigma^2 times it is sum_i alpha^2 s_i^2 / (alpha^2 s_i^2 + sigma^2), then averaged over t.
    sde, gm = TWO_SDES[sde_key](), gaussian()
    s2 = gm.stds.reshape(-1) ** 2

    def per_t(t):
        alpha, sigma = sde._alpha_sigma(t)
        a2s2 = alpha[:, None] ** 2 * s2
        return (a2s2 / (a2s2 + sigma[:, None] ** 2)).sum(1)

    if importance_sampling:  # E = 1/2 int g^2 (d/sigma^2 - ...) dt = 1/2 int sigma^2 (...) dl
        expected = 0.5 * _lam_integral(sde, per_t)
    else:
        expected = _t_average(sde, lambda t: per_t(t) * _weight_over_sigma2(sde, t, weighting, False, 2))
    x0 = gm.sample(20000, generator=_gen(0))
    loss = dsm_loss(gm.score_fn(sde), sde, x0, weighting=weighting, importance_sampling=importance_sampling,
                    generator=_gen(1))
    assert loss.shape == (20000,)
    _within(loss, expected)


@pytest.mark.parametrize("weighting,importance_sampling", SETTINGS)
@pytest.mark.parametrize("sde_key", list(TWO_SDES))
def test_dsm_minimum_mixture(sde_key, weighting, importance_sampling):
    # Since E[grad log p(x_t|x0) | x_t] = s_exact(x_t), at fixed t
    #   E||s_exact - grad log p(x_t|x0)||^2 = E||grad log p(x_t|x0)||^2 - E||s_exact||^2 = d/sigma^2 - E||s_exact||^2.
    # With the same (t, eps) draws, loss_i - w(t_i) (d - sigma_i^2 ||s_exact(x_t_i)||^2) has mean 0.
    sde, gm = TWO_SDES[sde_key](), mixture()
    x0 = gm.sample(20000, generator=_gen(2))
    score = gm.score_fn(sde)
    loss = dsm_loss(score, sde, x0, weighting=weighting, importance_sampling=importance_sampling, generator=_gen(3))
    t, eps = _draws(sde, x0, 3, importance_sampling)
    alpha, sigma = sde._alpha_sigma(t)
    x_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps
    rhs = 2.0 - sigma**2 * score(x_t, t).pow(2).sum(1)
    _within(loss - _weight_over_sigma2(sde, t, weighting, importance_sampling, 2) * rhs, 0.0)


class _Offset(torch.nn.Module):
    """The exact score plus a learnable offset ``delta * c``, one ``delta`` per sample (per-sample gradients)."""

    def __init__(self, score, c, n, delta):
        super().__init__()
        self.score, self.c = score, c
        self.delta = torch.nn.Parameter(torch.full((n, 1), float(delta), dtype=F64))

    def forward(self, x, t):
        return self.score(x, t) + self.delta * self.c


@pytest.mark.parametrize("weighting", ["simple", "sigma2"])
@pytest.mark.parametrize("sde_key", list(TWO_SDES))
def test_dsm_perturbed_score_costs_delta_squared(sde_key, weighting):
    # loss(s + delta c) - loss(s) = lambda(t) (2 delta c.(s - target) + delta^2 ||c||^2): in expectation
    # delta^2 ||c||^2 E[lambda], lambda = sigma^2 (sigma2) or sigma^2 / d (simple); d/d delta = 2 lambda
    # (c.(s - target) + delta ||c||^2), whose mean is 0 at delta = 0 and > 0 for delta > 0.
    sde, gm, n = TWO_SDES[sde_key](), mixture(), 8000
    c = torch.tensor([0.6, -0.8], dtype=F64)
    x0 = gm.sample(n, generator=_gen(4))
    scale = 0.5 if weighting == "simple" else 1.0
    e_lambda = scale * _t_average(sde, lambda t: sde._alpha_sigma(t)[1] ** 2)

    def run(delta):
        model = _Offset(gm.score_fn(sde), c, n, delta)
        loss = dsm_loss(model, sde, x0, weighting=weighting, generator=_gen(5))
        (grad,) = torch.autograd.grad(loss.sum(), model.delta)
        return loss.detach(), grad.reshape(-1)

    base, grad0 = run(0.0)
    delta = 0.5
    moved, grad1 = run(delta)
    excess, _ = _within(moved - base, delta**2 * e_lambda)
    assert excess > 0
    mean0, se0 = _within(grad0, 0.0)
    mean1, se1 = _within(grad1, 2.0 * delta * e_lambda)
    assert mean1 > Z * se1 and abs(mean0) < Z * se0


# ---------------------------------------------------------------------------------------------
# parameterizations and the "simple" loss
# ---------------------------------------------------------------------------------------------

def _as_parameterization(score, sde, parameterization):
    """The exact score rewritten by hand as an eps / x0 / v prediction (x = alpha x0 + sigma eps)."""

    def model(x, t):
        alpha, sigma = (bcast(c, x) for c in sde._alpha_sigma(t))
        s = score(x, t)
        eps = -sigma * s
        x0 = (x + sigma**2 * s) / alpha
        return {"score": s, "eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[parameterization]

    return model


@pytest.mark.parametrize("weighting,importance_sampling", SETTINGS)
def test_parameterizations_agree(sde, weighting, importance_sampling):
    gm = mixture()
    x0 = gm.sample(256, generator=_gen(6))
    losses = {p: dsm_loss(_as_parameterization(gm.score_fn(sde), sde, p), sde, x0, parameterization=p,
                          weighting=weighting, importance_sampling=importance_sampling, generator=_gen(7))
              for p in ("score", "eps", "x0", "v")}
    for p in ("eps", "x0", "v"):
        torch.testing.assert_close(losses[p], losses["score"], rtol=1e-8, atol=0.0, msg=p)


def _eps_net(x, t):
    # an arbitrary (wrong) eps predictor on image-shaped x
    return torch.tanh(x) * bcast(t, x) + 0.3 * torch.cos(x) - 0.1


def test_simple_eps_is_ddpm_mse_and_reductions():
    # x0 of shape (batch, 2, 3): "simple" averages over the 6 dims, "sigma2" sums, and the
    # likelihood weightings multiply the sum by (T - t_min)/2 g^2/sigma^2 or (l(t_min) - l(T))/2.
    sde = VPSDE()
    x0 = torch.randn(64, 2, 3, generator=_gen(8), dtype=F64)
    t, eps = _draws(sde, x0, 9)
    alpha, sigma = (bcast(c, x0) for c in sde._alpha_sigma(t))
    sq = (_eps_net(alpha * x0 + sigma * eps, t) - eps).pow(2).reshape(64, -1)

    def loss(weighting, importance_sampling=False):
        return dsm_loss(_eps_net, sde, x0, parameterization="eps", weighting=weighting,
                        importance_sampling=importance_sampling, generator=_gen(9))

    torch.testing.assert_close(loss("simple"), sq.mean(1), rtol=1e-13, atol=0.0)
    torch.testing.assert_close(loss("sigma2"), sq.sum(1), rtol=1e-13, atol=0.0)
    g2_over_s2 = sde._g2(t) / sde._alpha_sigma(t)[1] ** 2
    torch.testing.assert_close(loss("likelihood"), 0.5 * (1.0 - T_MIN) * g2_over_s2 * sq.sum(1), rtol=1e-12, atol=0.0)

    t_is, eps_is = _draws(sde, x0, 9, importance_sampling=True)
    alpha, sigma = (bcast(c, x0) for c in sde._alpha_sigma(t_is))
    sq_is = (_eps_net(alpha * x0 + sigma * eps_is, t_is) - eps_is).pow(2).reshape(64, -1).sum(1)
    hi, lo = _lam_range(sde)
    torch.testing.assert_close(loss("likelihood", True), 0.5 * (hi - lo) * sq_is, rtol=1e-12, atol=0.0)


def test_t_range_dtype_and_distribution():
    # t: (batch,) in x0's dtype, within [t_min, T]; its CDF is (tau - t_min)/(T - t_min) under uniform
    # sampling and (l(t_min) - l(tau)) / (l(t_min) - l(T)) under importance sampling (l uniform).
    sde, seen, n = VPSDE(), [], 4000

    def model(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    x0 = torch.randn(n, 2, generator=_gen(10), dtype=torch.float32)
    for importance_sampling in (False, True):
        out = dsm_loss(model, sde, x0, parameterization="eps", weighting="likelihood", t_min=0.2,
                       importance_sampling=importance_sampling, generator=_gen(11))
        assert out.dtype == torch.float32 and out.shape == (n,)
    for t in seen:
        assert t.shape == (n,) and t.dtype == torch.float32
        assert t.min() >= 0.2 and t.max() <= 1.0
    tau = torch.tensor([0.3, 0.5, 0.7], dtype=F64)
    lam = lambda t: sde._log_snr(torch.as_tensor(t, dtype=F64))  # noqa: E731
    cdfs = ((tau - 0.2) / 0.8, (lam(0.2) - lam(tau)) / (lam(0.2) - lam(1.0)))
    for t, cdf in zip(seen, cdfs):
        empirical = (t.double()[:, None] <= tau).double().mean(0)
        se = torch.sqrt(cdf * (1 - cdf) / n)
        assert bool(((empirical - cdf).abs() <= Z * se).all()), (empirical, cdf)


# ---------------------------------------------------------------------------------------------
# likelihood weighting and importance sampling
# ---------------------------------------------------------------------------------------------

def test_log_snr_derivative_identity(sde):
    # For dx = f x dt + g dW: d(alpha^2)/dt = 2 f alpha^2, d(sigma^2)/dt = 2 f sigma^2 + g^2, so
    # l = log alpha^2 - log sigma^2 has dl/dt = -g^2 / sigma^2: the IS density q(t) ∝ g^2/sigma^2.
    u = torch.rand(200, generator=_gen(12), dtype=F64)
    t = torch.cat([torch.tensor([T_MIN, 1e-3], dtype=F64), T_MIN + (sde.T - T_MIN) * u]).requires_grad_(True)
    (dlam,) = torch.autograd.grad(sde._log_snr(t).sum(), t)
    t = t.detach()
    torch.testing.assert_close(-dlam, sde._g2(t) / sde._alpha_sigma(t)[1] ** 2, rtol=1e-6, atol=0.0)


def test_importance_sampling_is_uniform_for_ve():
    # VE: l = -2 log sigma is linear in t, so the log-SNR proposal is the uniform one
    sde, gm = VESDE(), mixture()
    x0 = gm.sample(512, generator=_gen(13))
    a, b = (dsm_loss(gm.score_fn(sde), sde, x0, weighting="likelihood", importance_sampling=flag, generator=_gen(14))
            for flag in (False, True))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=0.0)


def _int_g2(sde, t_min=T_MIN):
    """int_{t_min}^T g^2 dt in closed form."""
    if isinstance(sde, VESDE):  # g^2 = d sigma^2 / dt
        s = sde._alpha_sigma(torch.tensor([t_min, sde.T], dtype=F64))[1]
        return (s[1] ** 2 - s[0] ** 2).item()
    la = sde.schedule.log_alpha(torch.tensor([t_min, sde.T], dtype=F64))
    integral = 2.0 * (la[0] - la[1]).item()  # int beta = -2 log alpha
    if isinstance(sde, SubVPSDE):  # minus int beta alpha^4 = (alpha(t_min)^4 - alpha(T)^4) / 2
        integral -= 0.5 * (torch.exp(4.0 * la[0]) - torch.exp(4.0 * la[1])).item()
    return integral


OFFSET_SDES = {"vp_linear": VPSDE, "vp_cosine": lambda: VPSDE(schedule="cosine"), "subvp_linear": SubVPSDE}


@pytest.mark.parametrize("name", list(OFFSET_SDES))
def test_importance_sampling_unbiased_score_offset(name):
    # A finite-variance comparison (the likelihood-weighted loss itself has a 1/t tail under uniform t):
    # D = loss(s + c) - loss(s) under common draws has E[D] = 1/2 ||c||^2 int g^2 dt for both samplers.
    # Measured (n = 8000) Var_IS(D) / Var_uniform(D): vp_linear 1.64, vp_cosine 0.71, subvp_linear 2.73.
    # So for a constant *score* offset IS does not reduce the variance (g^2 ||c||^2 is bounded under
    # uniform t, while IS spreads it as (l_max - l_min) sigma^2 ||c||^2 / 2); IS targets the 1/sigma^2
    # factor, as in the eps-offset test below.
    sde, gm, n = OFFSET_SDES[name](), mixture(), 8000
    c = torch.tensor([0.3, -0.2], dtype=F64)
    score = gm.score_fn(sde)
    x0 = gm.sample(n, generator=_gen(15))
    expected = 0.5 * c.pow(2).sum().item() * _int_g2(sde)
    for importance_sampling in (False, True):
        a, b = (dsm_loss(f, sde, x0, weighting="likelihood", importance_sampling=importance_sampling,
                         generator=_gen(16)) for f in (score, lambda x, t: score(x, t) + c))
        _within(b - a, expected)


def test_importance_sampling_variance_eps_offset():
    # An eps-prediction offset (out = eps_exact + c, i.e. score - c/sigma), what a network's error looks
    # like near t = 0: D = w(t) (||c||^2 - 2 c.r), r = sigma s + eps, with w = (T - t_min)/2 g^2/sigma^2
    # (uniform) or (l_max - l_min)/2 (IS). E[D] = 1/2 ||c||^2 (l_max - l_min) both ways; E[r | t] = 0, so
    # Var_uniform(D) >= Var_t(w) ||c||^4, computed here by quadrature (the sample variance of the
    # heavy-tailed uniform D is not to be trusted). Measured (n = 8000): Var_IS(D) = 36.6, bound 427
    # (ratio 11.7); the uniform sample variance was 4.6e3 and its mean 0.90 +- "0.76" against the true 1.55.
    sde, gm, n = VPSDE(), mixture(), 8000
    c = torch.tensor([0.3, -0.2], dtype=F64)
    c2 = c.pow(2).sum().item()
    hi, lo = _lam_range(sde)
    eps_exact = _as_parameterization(gm.score_fn(sde), sde, "eps")
    x0 = gm.sample(n, generator=_gen(17))
    a, b = (dsm_loss(f, sde, x0, parameterization="eps", weighting="likelihood", importance_sampling=True,
                     generator=_gen(18)) for f in (eps_exact, lambda x, t: eps_exact(x, t) + c))
    d_is = b - a
    _within(d_is, 0.5 * c2 * (hi - lo).item())
    # E_t[w^2] = (T - t_min)/4 int (g^2/sigma^2)^2 dt = (T - t_min)/4 int g^2/sigma^2 dl
    g2s2 = lambda t: sde._g2(t) / sde._alpha_sigma(t)[1] ** 2  # noqa: E731
    e_w2 = 0.25 * (sde.T - T_MIN) * _lam_integral(sde, g2s2)
    bound = c2**2 * (e_w2 - (0.5 * (hi - lo).item()) ** 2)
    assert d_is.var().item() * 5.0 < bound, (d_is.var().item(), bound)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def test_dsm_validation():
    sde, x0, ok = VPSDE(), torch.randn(8, 2, dtype=F64), (lambda x, t: x)
    with pytest.raises(ValueError, match=r"parameterization must be one of \('score', 'eps', 'x0', 'v'\)"):
        dsm_loss(ok, sde, x0, parameterization="epsilon")
    with pytest.raises(ValueError, match=r"weighting must be one of \('simple', 'sigma2', 'likelihood'\)"):
        dsm_loss(ok, sde, x0, weighting="uniform")
    with pytest.raises(ValueError, match="importance_sampling=True requires weighting='likelihood'"):
        dsm_loss(ok, sde, x0, weighting="sigma2", importance_sampling=True)
    with pytest.raises(TypeError, match="importance_sampling must be True or False"):
        dsm_loss(ok, sde, x0, importance_sampling="yes")
    for bad in (0.0, -1.0, 1.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match=r"t_min must .*in \(0.0, 1.0\)"):
            dsm_loss(ok, sde, x0, t_min=bad)
    with pytest.raises(TypeError, match="model must be callable"):
        dsm_loss("net", sde, x0)
    with pytest.raises(TypeError, match="sde must be an sdediff SDE"):
        dsm_loss(ok, "vp", x0)
    with pytest.raises(TypeError, match="x0 must have a floating-point dtype"):
        dsm_loss(ok, sde, torch.ones(8, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="x0 must have shape"):
        dsm_loss(ok, sde, torch.ones(0, 2))
    with pytest.raises(ValueError, match=r"model must return a tensor of the shape of x0 \(8, 2\)"):
        dsm_loss(lambda x, t: x[:, :1], sde, x0)


# ---------------------------------------------------------------------------------------------
# sliced score matching
# ---------------------------------------------------------------------------------------------

M = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
S = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
PREC = (1.0 / S**2).sum().item()  # sum 1/s_i^2 = 5.25


def _gauss_score(scale=1.0):
    return lambda x: -scale * (x - M) / S**2


@pytest.mark.parametrize("variance_reduction", [False, True])
@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_ssm_gaussian_closed_form(noise, variance_reduction):
    # Hyvarinen J(s) = E[tr(ds/dx) + 1/2 ||s||^2]; for k * the exact score of N(m, diag s^2):
    # J = (-k + k^2/2) sum 1/s_i^2, minimized at k = 1 (J = -PREC/2); k = 1.3 gives -0.455 PREC.
    x = M + S * torch.randn(20000, 3, generator=_gen(20), dtype=F64)
    kw = dict(projections=2, noise=noise, variance_reduction=variance_reduction)
    exact = ssm_loss(_gauss_score(), x, generator=_gen(21), **kw)
    scaled = ssm_loss(_gauss_score(1.3), x, generator=_gen(21), **kw)
    assert exact.shape == (20000,)
    _within(exact, -0.5 * PREC)
    _within(scaled, -0.455 * PREC)
    gap, _ = _within(scaled - exact, 0.045 * PREC)  # common draws
    assert gap > 0


def test_ssm_vr_rademacher_is_exact_per_sample():
    # Rademacher probes: v^T diag(a) v = sum a_i exactly, so SSM-VR equals tr + 1/2 ||s||^2 per sample.
    x = M + S * torch.randn(100, 3, generator=_gen(22), dtype=F64)
    loss = ssm_loss(_gauss_score(), x, projections=3, variance_reduction=True, generator=_gen(23))
    torch.testing.assert_close(loss, -PREC + 0.5 * _gauss_score()(x).pow(2).sum(1), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_ssm_backward_through_linear_model(noise):
    # For s(x) = W x + b the per-probe loss is v^T W v + 1/2 (v.(W x + b))^2; the parameter gradients
    # of ssm_loss must match those of this closed form (they would miss the v^T W v term without
    # create_graph=True). Probes reproduced from the documented draw: (projections, *x.shape).
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 3, dtype=F64)
    x = torch.randn(50, 3, generator=_gen(24), dtype=F64)
    P = 3
    loss = ssm_loss(net, x, projections=P, noise=noise, generator=_gen(25))
    loss.mean().backward()
    got = [p.grad.clone() for p in net.parameters()]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in got)

    g = _gen(25)
    if noise == "rademacher":
        v = torch.randint(0, 2, (P, 50, 3), generator=g).to(F64) * 2.0 - 1.0
    else:
        v = torch.randn(P, 50, 3, generator=g, dtype=F64)
    W, b = net.weight, net.bias
    vWv = torch.einsum("pni,ij,pnj->pn", v, W, v)
    by_hand = (vWv + 0.5 * (v * net(x)).sum(-1).pow(2)).mean(0)
    torch.testing.assert_close(loss.detach(), by_hand.detach(), rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(by_hand.mean(), [W, b])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_ssm_under_no_grad_and_constant_score():
    x = torch.randn(10, 3, generator=_gen(26), dtype=F64)
    with torch.no_grad():
        loss = ssm_loss(_gauss_score(), x, variance_reduction=True, generator=_gen(27))
    torch.testing.assert_close(loss, -PREC + 0.5 * _gauss_score()(x).pow(2).sum(1))
    const = torch.tensor([1.0, 2.0, 0.0], dtype=F64)
    loss = ssm_loss(lambda x: const.expand_as(x), x, variance_reduction=True)
    torch.testing.assert_close(loss, torch.full((10,), 2.5, dtype=F64))  # zero Jacobian, 1/2 ||s||^2


def test_ssm_validation():
    x, ok = torch.randn(4, 3, dtype=F64), _gauss_score()
    with pytest.raises(TypeError, match="score_model must be callable"):
        ssm_loss(None, x)
    with pytest.raises(ValueError, match=r"noise must be one of \('rademacher', 'gaussian'\)"):
        ssm_loss(ok, x, noise="uniform")
    with pytest.raises(ValueError, match="projections must be an int >= 1"):
        ssm_loss(ok, x, projections=0)
    with pytest.raises(TypeError, match="projections must be an int >= 1"):
        ssm_loss(ok, x, projections=1.5)
    with pytest.raises(TypeError, match="variance_reduction must be True or False"):
        ssm_loss(ok, x, variance_reduction=1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ssm_loss(ok, [[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"score_model must return a tensor of the shape of x \(4, 3\)"):
        ssm_loss(lambda x: x.sum(1), x)
