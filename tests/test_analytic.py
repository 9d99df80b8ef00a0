"""The Gaussian-mixture test bed: densities, scores, diffusion under each SDE, moments and sampling."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from sdediff import GaussianMixture

F64 = torch.float64


def _t(values):
    return torch.as_tensor(values, dtype=F64)


def mixture_2d():
    return GaussianMixture(
        weights=[2.0, 5.0, 3.0],  # unnormalized on purpose
        means=[[-2.0, 0.5], [1.0, 1.0], [0.5, -1.5]],
        stds=[[0.3, 0.6], [0.5, 0.4], [0.8, 0.8]],
    )


def mixture(dim, seed=0, K=4, stds="per_dim"):
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(K, dim, generator=g, dtype=F64)
    weights = 0.2 + torch.rand(K, generator=g, dtype=F64)
    if stds == "per_dim":
        s = 0.2 + torch.rand(K, dim, generator=g, dtype=F64)
    elif stds == "per_component":
        s = 0.2 + torch.rand(K, generator=g, dtype=F64)
    else:
        s = 0.7
    return GaussianMixture(weights, means, s)


def torch_reference(weights, means, stds):
    """The same mixture as a torch.distributions object (diagonal components)."""
    weights = torch.as_tensor(weights, dtype=F64)
    means = torch.as_tensor(means, dtype=F64).reshape(len(weights), -1)
    stds = torch.as_tensor(stds, dtype=F64)
    stds = torch.broadcast_to(stds.reshape(len(weights), -1) if stds.dim() else stds, means.shape)
    return MixtureSameFamily(Categorical(probs=weights / weights.sum()), Independent(Normal(means, stds), 1))


def diffused_reference(gm, sde, t):
    """p_t built by hand, with alpha and sigma evaluated in float64."""
    alpha, sigma = (c.item() for c in sde.marginal(_t(t)))
    K = gm.num_components
    s = gm.stds.reshape(K, -1)
    return torch_reference(gm.weights, alpha * gm.means.reshape(K, -1), torch.sqrt(alpha**2 * s**2 + sigma**2))


# ---------------------------------------------------------------------------------------------
# densities
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [1, 2, 5])
@pytest.mark.parametrize("stds", ["per_dim", "per_component", "scalar"])
def test_log_prob_matches_torch_mixture(dim, stds):
    gm = mixture(dim, stds=stds)
    s = {"per_dim": gm.stds, "per_component": gm.stds[:, 0], "scalar": 0.7}[stds]
    ref = torch_reference(gm.weights, gm.means, s)
    x = 2.5 * torch.randn(64, dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    lp = gm.log_prob(x)
    assert lp.shape == (64,) and lp.dtype == F64
    torch.testing.assert_close(lp, ref.log_prob(x), rtol=1e-12, atol=1e-12)
    assert float(gm.weights.sum()) == pytest.approx(1.0, abs=1e-15)
    # float32 queries run in float32
    lp32 = gm.log_prob(x.float())
    assert lp32.dtype == torch.float32
    torch.testing.assert_close(lp32.double(), lp, rtol=1e-5, atol=1e-4)


def _times(sde):
    return [0.0, 0.1, 0.5, sde.T]


def test_marginal_log_prob_is_the_diffused_mixture(sde):
    gm = mixture(3, seed=2)
    x = 2.0 * torch.randn(32, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    for t in _times(sde):
        ref = diffused_reference(gm, sde, t).log_prob(x)
        torch.testing.assert_close(gm.marginal_log_prob(sde, x, t), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gm.marginal_log_prob(sde, x, _t(t)), ref, rtol=1e-12, atol=1e-12)
        # diffused() builds the same mixture, with alpha and sigma in float64
        pt = gm.diffused(sde, t)
        assert isinstance(pt, GaussianMixture)
        torch.testing.assert_close(pt.log_prob(x), ref, rtol=1e-12, atol=1e-12)
    # per-sample times
    ts = torch.linspace(0.0, sde.T, 32, dtype=F64)
    per_sample = torch.stack([gm.marginal_log_prob(sde, x[i:i + 1], ts[i])[0] for i in range(32)])
    torch.testing.assert_close(gm.marginal_log_prob(sde, x, ts), per_sample, rtol=1e-14, atol=1e-14)


def test_marginal_score_is_gradient_of_marginal_log_prob(sde):
    gm = mixture(4, seed=4)
    x = 2.0 * torch.randn(16, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    for t in _times(sde) + [torch.linspace(0.0, sde.T, 16, dtype=F64)]:
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(gm.marginal_log_prob(sde, xg, t).sum(), xg)
        score = gm.marginal_score(sde, x, t)
        assert score.shape == x.shape and score.dtype == F64
        torch.testing.assert_close(score, grad, rtol=1e-10, atol=1e-10)
        # score_fn is the same function with t of shape (batch,), unvalidated
        t_vec = t if isinstance(t, torch.Tensor) else torch.full((16,), t, dtype=F64)
        torch.testing.assert_close(gm.score_fn(sde)(x, t_vec), score, rtol=1e-14, atol=1e-14)


def test_one_time_expanded_over_the_batch_is_computed_once_and_alike(sde):
    """The loops pass ``t.expand(batch)`` (stride 0): the mixture then computes its variances once;
    the score, density and classifier must equal those of the same times materialized per sample."""
    gm = GaussianMixture([1.0, 2.0, 3.0], torch.randn(3, 4, generator=torch.Generator().manual_seed(8), dtype=F64),
                         [[0.3, 0.6, 0.2, 1.0], [0.5, 0.4, 0.7, 0.3], [0.8, 0.8, 0.1, 0.5]], labels=[0, 1, 1])
    x = 2.0 * torch.randn(16, 4, generator=torch.Generator().manual_seed(9), dtype=F64)
    shared = torch.tensor(0.37 * sde.T, dtype=F64).expand(16)
    assert shared.stride(0) == 0
    materialized = shared.clone()
    y = torch.tensor([0, 1] * 8)
    for fn in (gm.score_fn(sde), lambda x, t: gm.marginal_log_prob(sde, x, t),
               lambda x, t: gm.classifier(sde)(x, t, y), lambda x, t: gm.conditional_score_fn(sde)(x, t, y)):
        torch.testing.assert_close(fn(x, shared), fn(x, materialized), rtol=1e-14, atol=1e-14)
    # Differentiated in t, each sample keeps its own entry (the shortcut would put it all on the first).
    grads = []
    for t in (torch.tensor(0.37 * sde.T, dtype=F64, requires_grad=True).expand(16),
              torch.full((16,), 0.37 * sde.T, dtype=F64, requires_grad=True)):
        (grad,) = torch.autograd.grad(gm.score_fn(sde)(x, t).sum(), t)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    jac = torch.func.jacrev(lambda t: gm.marginal_log_prob(sde, x, t))(shared)
    torch.testing.assert_close(jac.diagonal(), torch.autograd.grad(
        gm.marginal_log_prob(sde, x, materialized.requires_grad_()).sum(), materialized)[0], rtol=1e-12, atol=1e-12)


def test_score_of_single_gaussian_closed_form(sde):
    """K = 1: the score is (alpha mu - x) / (alpha^2 s^2 + sigma^2), written out."""
    mu, s = torch.tensor([[0.3, -1.2]], dtype=F64), torch.tensor([[0.5, 2.0]], dtype=F64)
    gm = GaussianMixture([1.0], mu, s)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    t = 0.4 * sde.T
    alpha, sigma = sde.marginal(_t(t))
    torch.testing.assert_close(gm.marginal_score(sde, x, t), (alpha * mu - x) / (alpha**2 * s**2 + sigma**2),
                               rtol=1e-14, atol=1e-14)


def test_score_fn_requires_sde():
    with pytest.raises(TypeError, match="sde"):
        mixture_2d().score_fn(lambda x, t: x)


def _density_integral(gm, sde, t):
    """Trapezoid rule on [-9, 9]^2 with spacing h = 0.075 (every component std s >= 0.3 = 4 h).

    For a Gaussian the trapezoid rule is spectrally accurate, error ~ exp(-2 pi^2 s^2 / h^2) < 1e-130,
    and the mass beyond +-9 (>= 6 std from every mean at t <= 0.5) is < 1e-9; so 1e-8 is a real bound.
    """
    u = torch.linspace(-9.0, 9.0, 241, dtype=F64)
    X, Y = torch.meshgrid(u, u, indexing="ij")
    pts = torch.stack([X.flatten(), Y.flatten()], 1)
    dens = torch.exp(gm.log_prob(pts) if sde is None else gm.marginal_log_prob(sde, pts, t)).reshape(X.shape)
    return torch.trapezoid(torch.trapezoid(dens, u, dim=1), u).item()


def test_density_integrates_to_one(sde):
    gm = mixture_2d()
    assert _density_integral(gm, None, None) == pytest.approx(1.0, abs=1e-8)
    for t in (0.0, 0.5):
        assert _density_integral(gm, sde, t) == pytest.approx(1.0, abs=1e-8)


# ---------------------------------------------------------------------------------------------
# moments and sampling
# ---------------------------------------------------------------------------------------------

def _reference_moments(gm):
    """Mean and covariance of the mixture from the law of total covariance, in numpy."""
    K = gm.num_components
    w = gm.weights.numpy()
    mu = gm.means.reshape(K, -1).numpy()
    var = gm.stds.reshape(K, -1).numpy() ** 2
    m = w @ mu
    second = sum(w[k] * (np.diag(var[k]) + np.outer(mu[k], mu[k])) for k in range(K))
    return m, second - np.outer(m, m)


def test_mean_and_covariance_closed_form():
    for gm in (mixture_2d(), mixture(5, seed=7)):
        m, C = _reference_moments(gm)
        np.testing.assert_allclose(gm.mean().numpy(), m, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(gm.covariance().numpy(), C, rtol=1e-13, atol=1e-14)
        ref = torch_reference(gm.weights, gm.means, gm.stds)
        torch.testing.assert_close(gm.mean(), ref.mean, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(torch.diagonal(gm.covariance()), ref.variance, rtol=1e-13, atol=1e-14)


def _assert_moments(x, mean, cov, n_se=5.0):
    """Sample mean and covariance within n_se standard errors of (mean, cov).

    The standard error of the mean is sqrt(cov_ii / n); that of the sample covariance entry ij is
    sqrt(Var[(x_i - m_i)(x_j - m_j)] / n), estimated from the samples themselves.
    """
    x = x.reshape(x.shape[0], -1).to(F64)
    mean = torch.as_tensor(mean, dtype=F64).reshape(-1)
    cov = torch.as_tensor(cov, dtype=F64)
    n = x.shape[0]
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert bool(((x.mean(0) - mean).abs() <= n_se * se_mean).all()), ((x.mean(0) - mean) / se_mean)
    c = x - mean
    prods = c[:, :, None] * c[:, None, :]
    se_cov = prods.std(0) / math.sqrt(n)
    sample_cov = torch.cov(x.T)
    assert bool(((sample_cov - cov).abs() <= n_se * se_cov).all()), ((sample_cov - cov) / se_cov)


def test_samples_have_mixture_moments():
    for gm in (mixture_2d(), mixture(5, seed=8)):
        n = 40_000
        x, labels = gm.sample(n, generator=torch.Generator().manual_seed(9), return_components=True)
        assert x.shape == (n, gm.dim) and x.dtype == F64 and labels.shape == (n,)
        _assert_moments(x, gm.mean(), gm.covariance())
        # given its label, a draw standardized by its component is N(0, I): a sharper check of the
        # within-component spread than the mixture covariance (SE of a variance is sqrt(2 / m))
        K = gm.num_components
        z = (x - gm.means.reshape(K, -1)[labels]) / gm.stds.reshape(K, -1)[labels]
        assert abs(z.mean().item()) <= 5 / math.sqrt(z.numel())
        assert abs(z.var().item() - 1) <= 5 * math.sqrt(2 / z.numel())
        # component frequencies: binomial standard error sqrt(w (1 - w) / n)
        freq = torch.bincount(labels, minlength=gm.num_components).double() / n
        assert bool(((freq - gm.weights).abs() <= 5 * torch.sqrt(gm.weights * (1 - gm.weights) / n)).all())
        # reproducible with a generator; dtype honoured
        again = gm.sample(n, generator=torch.Generator().manual_seed(9))
        assert torch.equal(x, again)
        assert gm.sample(3, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="n"):
        mixture_2d().sample(0)


def test_perturbed_samples_follow_the_diffused_mixture(sde):
    gm = mixture_2d()
    n = 40_000
    g = torch.Generator().manual_seed(10)
    x0 = gm.sample(n, generator=g)
    for t in (0.2 * sde.T, 0.6 * sde.T):
        noise = torch.randn(x0.shape, generator=g, dtype=F64)
        xt = sde.perturb(x0, t, noise)
        pt = gm.diffused(sde, t)
        _assert_moments(xt, pt.mean(), pt.covariance())
        # and diffused()'s moments are alpha m, alpha^2 C + sigma^2 I
        alpha, sigma = (c.item() for c in sde.marginal(_t(t)))
        torch.testing.assert_close(pt.mean(), alpha * gm.mean(), rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(pt.covariance(), alpha**2 * gm.covariance() + sigma**2 * torch.eye(2, dtype=F64),
                                   rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# non-vector events and validation
# ---------------------------------------------------------------------------------------------

def test_tensor_event_shape(sde):
    g = torch.Generator().manual_seed(11)
    K = 3
    means = torch.randn(K, 2, 3, generator=g, dtype=F64)
    stds = 0.3 + torch.rand(K, 2, 3, generator=g, dtype=F64)
    weights = [0.2, 0.3, 0.5]
    gm = GaussianMixture(weights, means, stds)
    flat = GaussianMixture(weights, means.reshape(K, 6), stds.reshape(K, 6))
    assert gm.event_shape == (2, 3) and gm.dim == 6
    x = torch.randn(10, 2, 3, generator=g, dtype=F64)
    torch.testing.assert_close(gm.log_prob(x), flat.log_prob(x.reshape(10, 6)), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(gm.log_prob(x), torch_reference(weights, means, stds).log_prob(x.reshape(10, 6)),
                               rtol=1e-12, atol=1e-12)
    t = 0.5 * sde.T
    score = gm.marginal_score(sde, x, t)
    assert score.shape == (10, 2, 3)
    torch.testing.assert_close(score.reshape(10, 6), flat.marginal_score(sde, x.reshape(10, 6), t),
                               rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(gm.score_fn(sde)(x, torch.full((10,), t, dtype=F64)), score, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(gm.marginal_log_prob(sde, x, t), flat.marginal_log_prob(sde, x.reshape(10, 6), t),
                               rtol=1e-14, atol=1e-14)
    assert gm.sample(7, generator=g).shape == (7, 2, 3)
    assert gm.mean().shape == (2, 3) and gm.covariance().shape == (6, 6)
    torch.testing.assert_close(gm.mean().reshape(6), flat.mean(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(gm.covariance(), flat.covariance(), rtol=1e-14, atol=1e-14)
    assert gm.diffused(sde, t).event_shape == (2, 3)
    # isotropic per-component stds broadcast over a tensor event
    iso = GaussianMixture(weights, means, torch.tensor([0.5, 1.0, 2.0]))
    torch.testing.assert_close(iso.stds[:, 1, 2], torch.tensor([0.5, 1.0, 2.0], dtype=F64))
    with pytest.raises(ValueError, match="x"):
        gm.log_prob(torch.zeros(4, 6, dtype=F64))


@pytest.mark.parametrize(
    "weights,means,stds,match",
    [
        ([0.5, 0.5], [0.0, 1.0], 1.0, "means"),            # means must be (K, *event)
        ([0.5, -0.5], [[0.0], [1.0]], 1.0, "weights"),
        ([1.0], [[0.0], [1.0]], 1.0, "weights"),
        ([0.5, 0.5], [[0.0], [1.0]], 0.0, "stds"),
        ([0.5, 0.5], [[0.0, 1.0], [1.0, 0.0]], [1.0, 2.0, 3.0], "stds"),
    ],
)
def test_mixture_validation(weights, means, stds, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(weights, means, stds)


def test_query_validation(sde):
    gm = mixture_2d()
    with pytest.raises(ValueError, match="x"):
        gm.log_prob(torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match="x"):
        gm.marginal_log_prob(sde, torch.zeros(3, 2, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="^t "):
        gm.marginal_score(sde, torch.zeros(3, 2, dtype=F64), 1.5 * sde.T)
