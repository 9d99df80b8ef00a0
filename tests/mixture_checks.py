"""Checks shared by the tests: samples against an exact mixture, and the mixture's posterior means by hand."""

import math
from typing import NamedTuple

import torch


class Allowance(NamedTuple):
    """Known biases added to the sampling-error bounds: mode weight, mean, relative variance, correlation."""

    weight: float = 0.0
    mean: float = 0.0
    var: float = 0.0
    cov: float = 0.0


def assert_matches_mixture(x, target, z: float, allow: Allowance = Allowance()):
    """Mode weights, per-mode means, variances and correlations of ``x: (n, 2)`` within ``z`` standard errors.

    Samples are assigned to the most likely component. Standard errors (Gaussian components, n
    samples, n_k in mode k): weight sqrt(w (1 - w) / n); mean s / sqrt(n_k); relative variance
    sqrt(2 / n_k); correlation 1 / sqrt(n_k). ``allow`` adds a measured bias to each bound.
    """
    assert bool(torch.isfinite(x).all())
    n = x.shape[0]
    labels = target.component_log_prob(x).argmax(1)
    for k in range(target.num_components):
        w, mu, s = target.weights[k].item(), target.means[k], target.stds[k]
        xk = x[labels == k]
        nk = xk.shape[0]
        assert abs(nk / n - w) <= z * math.sqrt(w * (1 - w) / n) + allow.weight, (k, nk / n, w)
        assert ((xk.mean(0) - mu).abs() <= z * s / math.sqrt(nk) + allow.mean).all(), (k, xk.mean(0), mu)
        cov = torch.cov(xk.T)
        rel_var = cov.diagonal() / s**2 - 1.0
        assert (rel_var.abs() <= z * math.sqrt(2.0 / nk) + allow.var).all(), (k, rel_var)
        assert abs(cov[0, 1].item()) / (s[0] * s[1]).item() <= z / math.sqrt(nk) + allow.cov, (k, cov)


def mixture_eps_x0(gm, x, alpha, sigma):
    """``E[eps | x_t = x]`` and ``E[x_0 | x_t = x]`` for ``x_t = alpha x_0 + sigma eps``; ``alpha, sigma``: 0-d or ``(batch,)``.

    Written from the mixture's parameters, independently of sdediff: component k has
    ``x_t ~ N(alpha mu_k, alpha^2 s_k^2 + sigma^2)`` (diagonal), the posterior mean of ``x_0`` is
    ``mu_k + alpha s_k^2 / var_k (x - alpha mu_k)``, and the responsibilities follow by Bayes.
    """
    K = gm.num_components
    alpha, sigma = torch.as_tensor(alpha, dtype=x.dtype), torch.as_tensor(sigma, dtype=x.dtype)
    a, s2 = alpha.reshape(-1, 1, 1), sigma.reshape(-1, 1, 1) ** 2
    mu, v = gm.means.reshape(1, K, -1), gm.stds.reshape(1, K, -1) ** 2
    xf = x.reshape(x.shape[0], 1, -1)
    var = a**2 * v + s2
    log_r = torch.log(gm.weights) - 0.5 * ((xf - a * mu) ** 2 / var + torch.log(var)).sum(-1)
    r = torch.softmax(log_r, 1).unsqueeze(-1)
    x0 = (r * (mu + a * v / var * (xf - a * mu))).sum(1).reshape(x.shape)
    # eps = E[(x - alpha x0) / sigma | x]: per component (x - alpha E[x0 | x, k]) / sigma
    eps = (r * (s2 / var * (xf - a * mu))).sum(1).reshape(x.shape) / sigma.reshape(-1, *([1] * (x.dim() - 1)))
    return eps, x0
