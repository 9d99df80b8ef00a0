"""Explicit Runge–Kutta solvers for ``dx/dt = f(x, t)`` (``f = term.vector_field``) on a fixed grid.

Steps may run in either time direction.
"""

from __future__ import annotations

import torch

from .base import ODESolver, register_solver


@register_solver
class Euler(ODESolver):
    """``x1 = x0 + h f(x0, t0)``; order 1."""

    name, order, evals_per_step = "euler", 1, 1

    def step(self, term, x, t0, t1):
        return torch.addcmul(x, t1 - t0, term.vector_field(x, t0))


@register_solver
class Midpoint(ODESolver):
    """Explicit midpoint: ``x1 = x0 + h f(x0 + h/2 k1, t0 + h/2)``; order 2."""

    name, order, evals_per_step = "midpoint", 2, 2

    def step(self, term, x, t0, t1):
        f = term.vector_field
        h = t1 - t0
        k1 = f(x, t0)
        return x + h * f(x + 0.5 * h * k1, t0 + 0.5 * h)


@register_solver
class Heun(ODESolver):
    """Heun (explicit trapezoid): ``x1 = x0 + h/2 (f(x0, t0) + f(x0 + h k1, t1))``; order 2."""

    name, order, evals_per_step = "heun", 2, 2

    def step(self, term, x, t0, t1):
        f = term.vector_field
        h = t1 - t0
        k1 = f(x, t0)
        k2 = f(x + h * k1, t1)
        return x + 0.5 * h * (k1 + k2)


@register_solver
class RK4(ODESolver):
    """The classical fourth-order Runge–Kutta method; order 4."""

    name, order, evals_per_step = "rk4", 4, 4

    def step(self, term, x, t0, t1):
        f = term.vector_field
        h = t1 - t0
        half = t0 + 0.5 * h
        k1 = f(x, t0)
        k2 = f(x + 0.5 * h * k1, half)
        k3 = f(x + 0.5 * h * k2, half)
        k4 = f(x + h * k3, t1)
        return x + (h / 6.0) * (k1 + 2.0 * (k2 + k3) + k4)
