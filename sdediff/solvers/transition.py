"""Steps built from the forward process's Gaussian transitions: DDIM, DDPM ancestral, reverse diffusion.

For a forward process with marginals ``x_t = alpha_t x_0 + sigma_t eps``, a step from ``t`` to
``s < t`` can use the exact Gaussian kernels instead of a Taylor expansion in ``t``. With
``r = (alpha_t sigma_s / (alpha_s sigma_t))^2 = exp(lambda_t - lambda_s) < 1``:

* transition ``q(x_t | x_s)``: mean ``(alpha_t / alpha_s) x_s``, variance ``sigma_t^2 (1 - r)``
  (``beta`` of a DDPM step for the VP SDE, ``sigma_t^2 - sigma_s^2`` for the VE SDE);
* posterior ``q(x_s | x_t, x_0)``: variance ``sigma_s^2 (1 - r)`` and mean
  ``alpha_s x_0 + sigma_s sqrt(r) eps`` with ``eps = (x_t - alpha_t x_0) / sigma_t``.

Plugging in the model's ``(x0, eps)`` (from the score, see :meth:`ReverseProcess.predict`) gives
DDPM's ancestral step and DDIM's generalized step (Song, Meng & Ermon 2021):

    x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z,   c^2 = eta^2 sigma_s^2 (1 - r).

``eta = 0`` is the probability-flow ODE's first-order exponential integrator; as the step
shrinks, ``c^2 -> eta^2 g^2 |dt|``, so ``eta`` is the reverse process's ``stochasticity``.
These solvers read ``term.process``; they work for every SDE here (VP, sub-VP, VE).
"""

from __future__ import annotations

import torch

from .._checks import real
from ..sdes import bcast
from .base import ODESolver, SDESolver, register_solver

VARIANCES = ("posterior", "beta")


def _kernel(sde, x, t0, t1):
    """``(alpha_t, sigma_t, alpha_s, sigma_s, r)`` for the step ``t0 -> t1``, broadcast against ``x``."""
    (a_t, sig_t), (a_s, sig_s) = sde._alpha_sigma(t0), sde._alpha_sigma(t1)
    r = (a_t * sig_s / (a_s * sig_t)) ** 2
    return tuple(bcast(c, x) for c in (a_t, sig_t, a_s, sig_s, r))


class _Predicting:
    """Shared options: clip the predicted ``x0`` to ``[-clip_x0, clip_x0]`` and choose the ``eps`` used after."""

    def __init__(self, clip_x0: float | None = None, eps_from_clipped_x0: bool = False):
        self.clip_x0 = None if clip_x0 is None else real("clip_x0", clip_x0, low=0.0, low_open=True)
        self.eps_from_clipped_x0 = bool(eps_from_clipped_x0)

    def _predict(self, process, x, t, a_t, sig_t):
        x0, eps = process.predict(x, t)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            if self.eps_from_clipped_x0:
                eps = (x - a_t * x0) / sig_t
        return x0, eps


@register_solver
class DDIM(_Predicting, ODESolver):
    """DDIM (eta = 0): ``x_s = alpha_s x0 + sigma_s eps``; order 1, one score call per step.

    In the variables ``x / alpha`` and ``sigma / alpha`` the probability-flow ODE reads
    ``d(x / alpha) = eps d(sigma / alpha)`` and this is its Euler step; equivalently the first-order
    exponential integrator in log-SNR time (DPM-Solver-1). Exact when ``eps`` is constant in time.
    """

    name, order, evals_per_step, needs_process, default_grid = "ddim", 1, 1, True, "log_snr"

    def step(self, term, x, t0, t1):
        a_t, sig_t, a_s, sig_s, _ = _kernel(term.process.sde, x, t0, t1)
        x0, eps = self._predict(term.process, x, t0, a_t, sig_t)
        return a_s * x0 + sig_s * eps


@register_solver
class Ancestral(_Predicting, SDESolver):
    """Ancestral sampling from the posterior ``q(x_s | x_t, x0)`` with ``eta`` = the process's stochasticity.

    ``variance="posterior"``: DDIM's step above (``eta = 1``: DDPM with the posterior variance
    ``beta~``; on the VE SDE, score_sde's ancestral sampler). ``variance="beta"``: DDPM's larger
    choice, the posterior mean with the transition variance ``sigma_t^2 (1 - r)`` (= ``beta_t``);
    it needs stochasticity 1. ``variance`` may also be a :class:`sdediff.LearnedVariance`
    network: the variance ``exp(frac log beta + (1 - frac) log beta~)`` interpolates the two with
    the network's ``frac`` at ``(x_t, t)`` (improved DDPM; stochasticity 1). DDPM's posterior mean
    is written through ``x0``: with ``clip_x0``, pass ``eps_from_clipped_x0=True`` for it (DDIM's
    default keeps the model's ``eps``). The noise is ``z = dW / sqrt(|h|)``; weak order 1.
    """

    name, order, additive_order, evals_per_step, needs_process = "ancestral", 0.5, 1.0, 1, True

    def __init__(self, variance="posterior", clip_x0: float | None = None, eps_from_clipped_x0: bool = False):
        if variance not in VARIANCES and not callable(getattr(variance, "interpolation", None)):
            raise ValueError(f"variance must be one of {VARIANCES} or a LearnedVariance network, got {variance!r}")
        super().__init__(clip_x0, eps_from_clipped_x0)
        self.variance = variance

    def check_term(self, term):
        super().check_term(term)
        if self.variance != "posterior" and term.process.stochasticity != 1.0:
            which = "'beta'" if self.variance == "beta" else "learned"
            raise ValueError(f"variance={which} samples the reverse SDE with stochasticity 1, "
                             f"got {term.process.stochasticity}; use variance='posterior' for DDIM's eta")

    def step(self, term, x, t0, t1, dw):
        a_t, sig_t, a_s, sig_s, r = _kernel(term.process.sde, x, t0, t1)
        x0, eps = self._predict(term.process, x, t0, a_t, sig_t)
        eta2 = 1.0 if self.variance != "posterior" else term.process.stochasticity ** 2
        mean = a_s * x0 + sig_s * torch.sqrt(1.0 - eta2 * (1.0 - r)) * eps
        if dw is None:
            return mean
        if self.variance == "beta":
            var = sig_t**2 * (1.0 - r)
        elif self.variance == "posterior":
            var = eta2 * sig_s**2 * (1.0 - r)
        else:  # beta^frac beta~^(1 - frac): the log-space interpolation
            frac = self.variance.interpolation(x, t0)
            var = (1.0 - r) * sig_t ** (2.0 * frac) * sig_s ** (2.0 - 2.0 * frac)
        return mean + torch.sqrt(var / (t1 - t0).abs()) * dw


@register_solver
class ReverseDiffusion(SDESolver):
    """score_sde's reverse-diffusion predictor: reverse the transition ``x_t = a x_s + sqrt(v) z`` to first order.

    ``x_s = (2 - a) x_t + (1 + s^2)/2 v score(x_t, t) + s sqrt(v) z`` with ``a = alpha_t / alpha_s``,
    ``v = sigma_t^2 (1 - r)`` and ``s`` the stochasticity (VP: ``a = sqrt(1 - beta)``, ``v = beta``;
    VE: ``a = 1``, ``v = sigma_t^2 - sigma_s^2``). Weak order 1.
    """

    name, order, additive_order, evals_per_step, needs_process = "reverse_diffusion", 0.5, 1.0, 1, True

    def step(self, term, x, t0, t1, dw):
        process = term.process
        a_t, sig_t, a_s, _, r = _kernel(process.sde, x, t0, t1)
        a, v = a_t / a_s, sig_t**2 * (1.0 - r)
        mean = (2.0 - a) * x + process._score_weight * v * process.score(x, t0)
        if dw is None:
            return mean
        return mean + process.stochasticity * torch.sqrt(v / (t1 - t0).abs()) * dw
