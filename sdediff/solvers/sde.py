"""Fixed-step solvers for Itô SDEs ``dx = b(x, t) dt + g(x, t) dW`` with diagonal noise.

Steps may run backwards in time (``t1 < t0``, as for reverse-time sampling): the drift is
multiplied by the signed ``h = t1 - t0`` and the increment ``dw`` has variance ``|h|``.
"""

from __future__ import annotations

import torch

from .base import SDESolver, register_solver


@register_solver
class EulerMaruyama(SDESolver):
    """``x1 = x0 + b h + g dW``; strong order 0.5 (1.0 for additive noise), weak order 1."""

    name, order, additive_order, evals_per_step = "euler_maruyama", 0.5, 1.0, 1

    def step(self, term, x, t0, t1, dw):
        x1 = x + (t1 - t0) * term.drift(x, t0)
        return x1 if dw is None else x1 + term.diffusion(x, t0) * dw


@register_solver
class Milstein(SDESolver):
    """Milstein: Euler–Maruyama plus ``1/2 g (dg/dx) (dW^2 - |h|)``; strong order 1.0.

    For diagonal noise, component ``i`` uses ``d g_i / d x_i``. For additive noise (the VP, sub-VP
    and VE SDEs and their reverses) the correction vanishes and Milstein *is* Euler–Maruyama.
    """

    name, order, additive_order, evals_per_step = "milstein", 1.0, 1.0, 1

    def step(self, term, x, t0, t1, dw):
        h = t1 - t0
        x1 = x + h * term.drift(x, t0)
        if dw is None:
            return x1
        g = term.diffusion(x, t0)
        x1 = x1 + g * dw
        if term.additive:
            return x1
        if term.diffusion_dx is not None:
            dg = term.diffusion_dx(x, t0)
        else:
            # Under diagonal noise the Jacobian of g is diagonal, so J @ 1 is its diagonal.
            def g_of(y):
                return term.diffusion(y, t0).expand_as(y)

            _, dg = torch.func.jvp(g_of, (x,), (torch.ones_like(x),))
        return x1 + 0.5 * g * dg * (dw * dw - h.abs())
