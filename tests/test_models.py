"""Model adapters: exact eps / x0 / v predictors of a Gaussian mixture must give back its exact score."""

import pytest
import torch

from sdediff import GaussianMixture, as_score_fn, score_from_eps, score_from_v, score_from_x0
from sdediff.models import PREDICTIONS

from mixture_checks import mixture_eps_x0

F64 = torch.float64


def _mixture(event_shape=(3,)):
    g = torch.Generator().manual_seed(0)
    K = 3
    means = 1.5 * torch.randn((K,) + event_shape, generator=g, dtype=F64)
    stds = 0.3 + torch.rand((K,) + event_shape, generator=g, dtype=F64)
    return GaussianMixture([0.3, 0.3, 0.4], means, stds)


def _bc(c, x):
    return c.reshape(c.shape + (1,) * (x.dim() - 1))


def exact_predictors(gm, sde):
    """eps, x0 and v predictors of the diffused mixture, from its exact score.

    eps = -sigma score;  x0 = (x + sigma^2 score) / alpha (Tweedie);  v = alpha eps - sigma x0.
    """
    score_fn = gm.score_fn(sde)

    def coeffs(x, t):
        alpha, sigma = sde.marginal(t)
        return _bc(alpha, x), _bc(sigma, x)

    def eps_model(x, t):
        return -coeffs(x, t)[1] * score_fn(x, t)

    def x0_model(x, t):
        alpha, sigma = coeffs(x, t)
        return (x + sigma**2 * score_fn(x, t)) / alpha

    def v_model(x, t):
        alpha, sigma = coeffs(x, t)
        return alpha * eps_model(x, t) - sigma * x0_model(x, t)

    return {"eps": eps_model, "x0": x0_model, "v": v_model}


def _inputs(sde, event_shape=(3,), n=24):
    g = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn((n,) + event_shape, generator=g, dtype=F64)
    t = torch.linspace(0.02, 1.0, n, dtype=F64) * sde.T  # up to T: alpha ~ 7e-3 for VP at the end
    return x, t


def test_exact_predictors_are_consistent(sde):
    """Check the test's own predictors: x0 is the posterior mean, and x = alpha x0 + sigma eps."""
    gm = _mixture()
    x, t = _inputs(sde)
    pred = exact_predictors(gm, sde)
    torch.testing.assert_close(pred["x0"](x, t), mixture_eps_x0(gm, x, *sde.marginal(t))[1], rtol=1e-9, atol=1e-9)
    alpha, sigma = (_bc(c, x) for c in sde.marginal(t))
    torch.testing.assert_close(alpha * pred["x0"](x, t) + sigma * pred["eps"](x, t), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("event_shape", [(3,), (2, 3)])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_adapters_recover_exact_score(sde, prediction, event_shape):
    gm = _mixture(event_shape)
    x, t = _inputs(sde, event_shape)
    model = exact_predictors(gm, sde)[prediction]
    exact = gm.score_fn(sde)(x, t)
    helper = {"eps": score_from_eps, "x0": score_from_x0, "v": score_from_v}[prediction]
    for score_fn in (as_score_fn(model, sde, prediction), helper(model, sde)):
        out = score_fn(x, t)
        assert out.shape == x.shape and out.dtype == F64
        # relative to the score's scale: x0 goes through a division by alpha ~ 7e-3 at t = T
        torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-10 * exact.abs().max().item())


def test_adapter_default_is_eps_and_score_passes_through(sde):
    gm = _mixture()
    x, t = _inputs(sde)
    eps_model = exact_predictors(gm, sde)["eps"]
    torch.testing.assert_close(as_score_fn(eps_model, sde)(x, t), gm.score_fn(sde)(x, t), rtol=1e-10, atol=1e-10)
    score_fn = gm.score_fn(sde)
    assert as_score_fn(score_fn, sde, "score") is score_fn
    assert set(PREDICTIONS) == {"score", "eps", "x0", "v"}


def test_adapters_are_not_interchangeable(sde):
    """Feeding a predictor to the wrong adapter gives a wrong score: the checks above can fail."""
    gm = _mixture()
    x, t = _inputs(sde)
    pred = exact_predictors(gm, sde)
    exact = gm.score_fn(sde)(x, t)
    for given, claimed in [("eps", "x0"), ("x0", "v"), ("v", "eps")]:
        wrong = as_score_fn(pred[given], sde, claimed)(x, t)
        assert (wrong - exact).abs().max() > 1e-2, (given, claimed)


def test_adapter_validation(sde):
    with pytest.raises(ValueError, match="prediction"):
        as_score_fn(lambda x, t: x, sde, "noise")
    with pytest.raises(TypeError, match="model"):
        as_score_fn(None, sde, "eps")
    with pytest.raises(TypeError, match="sde"):
        as_score_fn(lambda x, t: x, "vp", "eps")
    with pytest.raises(TypeError, match="sde"):
        score_from_x0(lambda x, t: x, None)
