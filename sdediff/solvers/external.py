"""Solvers delegated to torchdiffeq (adaptive ODE) and torchsde (higher-order SDE).

They integrate a whole grid at once, so they implement ``solve`` instead of ``step``; the
libraries are imported on first use.
"""

from __future__ import annotations

import torch

from ..terms import Field, SDETerm
from .base import ODESolver, SDESolver, register_solver


class TorchdiffeqSolver(ODESolver):
    """An adaptive Runge–Kutta method of torchdiffeq (``dopri5``, ...), with ``rtol`` and ``atol``."""

    adaptive = True
    evals_per_step = 0  # variable

    def __init__(self, method: str, order: int):
        self.name, self.order = method, order

    def solve(self, f: Field, x: torch.Tensor, ts: torch.Tensor, *, rtol: float, atol: float) -> torch.Tensor:
        """States at every time of ``ts`` (monotone, either direction): ``(len(ts), *x.shape)``."""
        import torchdiffeq

        # The field must not be evaluated outside the grid (VP coefficients are undefined for
        # t < 0). step_t makes the last step land on the final time instead of stepping past it
        # and interpolating; the clamp covers the trial evaluation of torchdiffeq's initial-step
        # heuristic, which only sizes the first step.
        lo, hi = ts.min(), ts.max()
        options = {"step_t": ts[-1:]}
        return torchdiffeq.odeint(lambda t, y: f(y, t.clamp(lo, hi)), x, ts, method=self.name, rtol=rtol,
                                  atol=atol, options=options)


def elapsed_time(t: torch.Tensor, t_first: torch.Tensor) -> torch.Tensor:
    """torchsde's increasing time ``s = |t - t_first|`` for a grid starting at ``t_first``.

    The one place this map is written: every reader of a torchsde Brownian motion must query it
    at bitwise the same times to see the same path.
    """
    return (t - t_first).abs()


class _TorchsdeTerm:
    """An :class:`SDETerm` in torchsde's form: elapsed time ``s = |t - t_first|``, flat states."""

    def __init__(self, term: SDETerm, t_first, direction: float, event_shape, sde_type: str, noise_type: str):
        self.term, self.t_first, self.direction = term, t_first, direction
        self.event_shape, self.sde_type, self.noise_type = tuple(event_shape), sde_type, noise_type

    def _xt(self, s, y):
        return y.reshape(y.shape[0], *self.event_shape), self.t_first + self.direction * s

    def f(self, s, y):
        x, t = self._xt(s, y)
        return (self.direction * self.term.drift(x, t)).reshape(y.shape)

    def g(self, s, y):
        x, t = self._xt(s, y)
        # in the state's dtype: a float32 time (a half-precision state's) must not promote the state
        return self.term.diffusion(x, t).to(x.dtype).expand(x.shape).reshape(y.shape)

    def g_prod(self, s, y, v):
        # Diagonal noise: g @ v is elementwise, also under torchsde's "additive" noise type.
        return self.g(s, y) * v


class TorchsdeSolver(SDESolver):
    """A torchsde method stepped exactly on the grid, with a ``BrownianInterval``.

    The steps go through torchsde's solver classes (``torchsde._core``) rather than ``sdeint``,
    which would evaluate the drift once more per call for shape checks and could not step on a
    non-uniform grid. ``additive_form``: for additive noise, use torchsde's "additive" noise type
    (SRK then takes its cheaper order-1.5 SRA1 scheme).
    """

    def __init__(self, method: str, order: float, additive_order: float, sde_type: str, evals_per_step: int,
                 additive_form: bool = False):
        self.name, self.order, self.additive_order = method, order, additive_order
        self.sde_type, self.evals_per_step, self.additive_form = sde_type, evals_per_step, additive_form

    def solve(self, term: SDETerm, x: torch.Tensor, ts: torch.Tensor, *, bm=None, generator=None) -> torch.Tensor:
        """States at every time of ``ts``: ``(len(ts), *x.shape)``.

        ``bm`` is a torchsde Brownian motion over the elapsed time ``[0, |ts[-1] - ts[0]|]`` of shape
        ``(batch, prod(dims))``; by default one is made from a seed drawn from ``generator``.
        """
        import torchsde
        from torchsde._core import base_sde, methods

        if self.sde_type == "stratonovich" and not term.additive:
            raise ValueError(f"solver {self.name!r} solves Stratonovich SDEs; it is used here only for additive noise")
        if bm is not None and not isinstance(bm, torchsde.BaseBrownian):
            raise TypeError(f"solver {self.name!r} needs a torchsde Brownian motion (with Lévy areas) as brownian, "
                            f"got {type(bm).__name__}")
        ts_host = ts.detach().to("cpu", torch.float64)
        direction = 1.0 if ts_host[-1] > ts_host[0] else -1.0
        s = elapsed_time(ts, ts[0])
        y = x.reshape(x.shape[0], -1)
        if bm is None:
            gen_device = generator.device if generator is not None else "cpu"
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
            bm = torchsde.BrownianInterval(
                t0=0.0, t1=float((ts_host[-1] - ts_host[0]).abs()), size=y.shape, dtype=x.dtype,
                device=x.device, entropy=seed, levy_area_approximation="space-time",
            )
        noise_type = "additive" if (self.additive_form and term.additive) else "diagonal"
        sde = base_sde.ForwardSDE(_TorchsdeTerm(term, ts[0], direction, x.shape[1:], self.sde_type, noise_type))
        solver = methods.select(method=self.name, sde_type=self.sde_type)(
            sde=sde, bm=bm, dt=1.0, adaptive=False, rtol=0.0, atol=0.0, dt_min=0.0, options={}
        )
        extra = solver.init_extra_solver_state(s[0], y)
        ys = [y]
        for i in range(len(ts) - 1):
            y, extra = solver.step(s[i], s[i + 1], y, extra)
            ys.append(y)
        return torch.stack(ys).reshape(len(ys), *x.shape)


for _method, _order in (("dopri5", 5), ("dopri8", 8), ("bosh3", 3), ("fehlberg2", 2), ("adaptive_heun", 2)):
    register_solver(TorchdiffeqSolver(_method, _order))
# Strong orders (diagonal, additive noise) and drift evaluations per step for additive noise, the
# case of every reverse-time diffusion here (torchsde's SRA1 evaluates its first stage twice;
# reversible Heun adds one evaluation at the start).
register_solver(TorchsdeSolver("srk", 1.0, 1.5, "ito", evals_per_step=3, additive_form=True))
register_solver(TorchsdeSolver("reversible_heun", 0.5, 1.0, "stratonovich", evals_per_step=1))
