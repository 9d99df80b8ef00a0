"""Single-step exponential integrators of the probability-flow ODE in log-SNR time (DPM-Solver).

With ``lambda = log(alpha / sigma)`` (half the log-SNR) the probability-flow ODE has the exact
variation-of-constants form, for a step from ``t`` to ``s`` with ``h = lambda_s - lambda_t > 0``,

    x_s = (alpha_s / alpha_t) x_t - alpha_s int_{lambda_t}^{lambda_s} e^{-lambda} eps(lambda) dlambda,

so only the noise prediction ``eps`` is approximated; the linear part is integrated exactly.
DPM-Solver-k (Lu et al. 2022) expands ``eps`` to order ``k - 1`` with ``k - 1`` intermediate
evaluations. Order 1 is DDIM: ``x_s = (alpha_s / alpha_t) x_t - sigma_s (e^h - 1) eps_t``.
"""

from __future__ import annotations

import math

import torch

from .base import ODESolver, register_solver


class DPMSolver(ODESolver):
    """DPM-Solver-``order`` (1, 2 or 3), single step, noise prediction; ``order`` score calls per step.

    Intermediate points at ``lambda_t + r h`` with ``r = 1/2`` (order 2) and ``r = 1/3, 2/3`` (order 3).
    """

    needs_process = True
    default_grid = "log_snr"

    def __init__(self, order: int = 2):
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        self.order = self.evals_per_step = order
        self.name = f"dpm_solver_{order}"

    def step(self, term, x, t0, t1):
        process = term.process
        sde = process.sde
        lam_t, lam_s = 0.5 * sde._log_snr(t0), 0.5 * sde._log_snr(t1)
        h = lam_s - lam_t
        (a_t, _), (a_s, sig_s) = sde._alpha_sigma(t0), sde._alpha_sigma(t1)
        eps_t = process.predict(x, t0)[1]

        def at(r):
            """``(t, alpha, sigma)`` at ``lambda_t + r h``, and the first-order move there from ``x``."""
            t = sde._t_from_log_snr(2.0 * (lam_t + r * h))
            a, sig = sde._alpha_sigma(t)
            return t, a, sig, (a / a_t) * x - (sig * torch.expm1(r * h)) * eps_t

        if self.order == 1:
            return (a_s / a_t) * x - (sig_s * torch.expm1(h)) * eps_t
        if self.order == 2:
            t_mid, _, _, u = at(0.5)
            d1 = process.predict(u, t_mid)[1] - eps_t
            return (a_s / a_t) * x - (sig_s * torch.expm1(h)) * eps_t - (sig_s * torch.expm1(h)) * d1
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        t1_, _, _, u1 = at(r1)
        d1 = process.predict(u1, t1_)[1] - eps_t
        t2_, _, sig2, u2 = at(r2)
        u2 = u2 - (sig2 * (r2 / r1) * (torch.expm1(r2 * h) / (r2 * h) - 1.0)) * d1
        d2 = process.predict(u2, t2_)[1] - eps_t
        return (a_s / a_t) * x - (sig_s * torch.expm1(h)) * eps_t - (sig_s / r2 * (torch.expm1(h) / h - 1.0)) * d2


register_solver(DPMSolver(2))
register_solver(DPMSolver(3))


def exp_moments(h: float, count: int) -> list[float]:
    """``I_m = int_0^h e^(u - h) u^m du`` for ``m < count``, from series of terms of one sign.

    ``h >= 0``: ``I_m = e^-h sum_n h^(n+m+1) / (n! (n+m+1))``; ``h < 0`` (a step forward in
    ``t``): ``I_m = m! h^(m+1) sum_n (-h)^n / (n+m+1)!``. No cancellation for small ``|h|``,
    unlike the recurrence ``I_m = h^m - m I_(m-1)``.
    """
    if not math.isfinite(h):
        raise ValueError(f"h must be finite, got {h}")
    out = []
    for m in range(count):
        if h >= 0.0:
            total, term, n = 0.0, h ** (m + 1), 0  # term = h^(n+m+1) / n!
            while True:
                add = term / (n + m + 1)
                total += add
                n += 1
                term *= h / n
                if add <= 1e-17 * total and n > h:
                    break
            out.append(math.exp(-h) * total)
        else:  # a step forward in t: I_m = m! h^(m+1) sum_n (-h)^n / (n+m+1)!, positive terms for h < 0
            total, term, n = 0.0, 1.0 / math.factorial(m + 1), 0
            while True:
                total += term
                n += 1
                term *= -h / (n + m + 1)
                if term <= 1e-17 * total and n > -h:
                    break
            out.append(math.factorial(m) * h ** (m + 1) * total)
    return out


def poly_moments(a: float, b: float, count: int) -> list[float]:
    """``int_a^b u^m du`` for ``m < count``."""
    return [(b ** (m + 1) - a ** (m + 1)) / (m + 1) for m in range(count)]


def lagrange_weights(nodes: list[float], moments: list[float]) -> list[float]:
    """``w_j = int K(u) L_j(u) du`` for the Lagrange basis ``L_j`` on ``nodes``, from the kernel's monomial moments.

    Integrating the interpolant of values ``f_j`` at ``nodes`` against ``K`` is then ``sum_j w_j f_j``:
    the weights of an Adams-type method (``K = 1``) or an exponential one (``K = e^(u - h)``).
    """
    weights = []
    for j, uj in enumerate(nodes):
        coeffs, denom = [1.0], 1.0  # L_j's numerator, lowest degree first
        for k, uk in enumerate(nodes):
            if k != j:
                grown = [0.0] * (len(coeffs) + 1)
                for m, c in enumerate(coeffs):
                    grown[m + 1] += c
                    grown[m] -= uk * c
                coeffs, denom = grown, denom * (uj - uk)
        weights.append(sum(c * mom for c, mom in zip(coeffs, moments)) / denom)
    return weights


def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of ``n``-point Gauss–Legendre quadrature on ``[-1, 1]`` (Golub–Welsch), float64."""
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4.0 * k**2 - 1.0)
    nodes, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    return nodes, 2.0 * vectors[0] ** 2


_GAUSS_NODES, _GAUSS_WEIGHTS = gauss_legendre(24)


def exp_weights(h: float, nodes: list[float], lam0: float = 0.0, variable=None) -> list[float]:
    """``w_j = int_0^h e^(u - h) L_j du``: the exponential-integrator weights of values at ``nodes`` (lambda offsets).

    ``L_j`` is the Lagrange basis on ``nodes`` in ``lambda`` itself (``variable=None``: closed-form
    moments), or in ``v = variable(lambda)`` (a map of float64 tensors, ``lambda = lam0 + u``), so
    the history is interpolated as a polynomial in another time, e.g. ``t`` (DEIS's "tAB");
    the integral is then taken by 24-point Gauss–Legendre quadrature, ample for a smooth ``v``.
    """
    if variable is None:
        return lagrange_weights(nodes, exp_moments(h, len(nodes)))
    u = 0.5 * h * (_GAUSS_NODES + 1.0)
    kernel = 0.5 * h * _GAUSS_WEIGHTS * torch.exp(u - h)
    v, v_nodes = variable(lam0 + u), variable(lam0 + torch.tensor(nodes, dtype=torch.float64)).tolist()
    weights = []
    for j, vj in enumerate(v_nodes):
        basis = torch.ones_like(v)
        for k, vk in enumerate(v_nodes):
            if k != j:
                basis = basis * (v - vk) / (vj - vk)
        weights.append(float((kernel * basis).sum()))
    return weights


def grid_table(sde, ts: torch.Tensor):
    """``(alpha, sigma, h, lambda)`` of the grid as lists of Python floats (float64), read once per solve.

    ``alpha``, ``sigma``, ``lambda = log(alpha / sigma)`` at each time; ``h[i] = lambda_(i+1) - lambda_i``.
    """
    t64 = ts.detach().to(device="cpu", dtype=torch.float64)
    alpha, sigma = sde._alpha_sigma(t64)
    lam = 0.5 * sde._log_snr(t64)
    return alpha.tolist(), sigma.tolist(), (lam[1:] - lam[:-1]).tolist(), lam.tolist()

