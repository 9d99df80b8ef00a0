"""The reverse-time processes of a forward SDE, built from a score function.

For ``dx = f(x, t) dt + g(t) dW`` with marginals ``p_t`` and any ``s >= 0``, the process

    dx = [f(x, t) - (1 + s^2)/2 g(t)^2 score(x, t)] dt + s g(t) dW̄,   t from T down to 0,

has the same marginals ``p_t`` (``s = 1``: Anderson's reverse SDE; ``s = 0``: the
probability-flow ODE; values between interpolate, as DDIM's ``eta`` does in discrete time).
"""

from __future__ import annotations

import copy

import torch

from . import _checks
from ._tensors import in_state_dtype
from .sdes import SDE, bcast, check_sde
from .terms import ODETerm, SDETerm


class ReverseProcess:
    """``dx = drift(x, t) dt + diffusion(t) dW̄`` integrated backwards in ``t``.

    Usable unchanged by:

    * sdediff's solvers and loops, through :meth:`drift` and :meth:`diffusion`;
    * torchdiffeq, as ``func(t, y)``: ``odeint(sde.probability_flow(score_fn), x, t_decreasing)``;
    * torchsde, through ``f``, ``g``, ``noise_type = "diagonal"``, ``sde_type``, in the elapsed
      reverse time ``tau = T - t`` (torchsde needs increasing times) and on flat states
      ``(batch, d)`` (set ``event_shape`` to reshape them for ``score_fn``).

    Additive noise makes Itô and Stratonovich coincide, so ``sde_type`` may be set to either to
    suit a torchsde method. Methods here do not validate ``t`` (they sit inside integration loops).
    """

    noise_type = "diagonal"

    def __init__(self, sde: SDE, score_fn, stochasticity: float = 1.0, *, event_shape=None, sde_type: str = "ito"):
        check_sde(sde)
        self.sde = sde
        self.score_fn = _checks.callable_("score_fn", score_fn)
        self.stochasticity = _checks.real("stochasticity", stochasticity, low=0.0)
        if sde_type not in ("ito", "stratonovich"):
            raise ValueError(f"sde_type must be 'ito' or 'stratonovich', got {sde_type!r}")
        self.sde_type = sde_type
        self.event_shape = None if event_shape is None else tuple(event_shape)
        self._score_weight = 0.5 * (1.0 + self.stochasticity**2)

    @property
    def T(self) -> float:
        return self.sde.T

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``score_fn(x, t)`` with ``t`` broadcast to ``(batch,)`` and its shape checked.

        For a half-precision state the loops carry times in float32 (bfloat16 cannot even hold the
        timestep 999 of a discrete model), and ``score_fn`` gets them so: a half-precision network
        casts its time input itself. Its score is returned in the state's dtype, so that an
        adapter's float32 ``alpha``, ``sigma`` do not promote the state.
        """
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        score = self.score_fn(x, t)
        if not isinstance(score, torch.Tensor) or score.shape != x.shape:
            got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise ValueError(f"score_fn must return a tensor of the shape of x {tuple(x.shape)}, got {got}")
        return in_state_dtype(score, x)

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``f(x, t) - (1 + s^2)/2 g(t)^2 score(x, t)``; ``x: (batch, *dims)``, ``t``: 0-d or ``(batch,)``."""
        score = self.score(x, t)
        f, g2 = self.sde._f_g2(t)
        c = g2 * -self._score_weight
        if t.dim():  # per-sample times (a 0-d coefficient broadcasts as it is)
            f, c = (None if f is None else bcast(f, x)), bcast(c, x)
        if f is None:  # no f x term; the result still takes x's dtype where it is the wider one
            return (c * score).to(torch.promote_types(x.dtype, score.dtype))  # (result_type does not trace)
        return torch.addcmul(f * x, c, score)

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """``s g(t)``, shape of ``t``."""
        return self.stochasticity * torch.sqrt(self.sde._g2(t))

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoised ``x0 = (x + sigma^2 score) / alpha`` and the noise ``eps = -sigma score`` (one score call).

        These are the posterior means ``E[x_0 | x_t]`` (Tweedie) and ``E[eps | x_t]``.
        """
        alpha, sigma = (bcast(c, x) for c in self.sde._alpha_sigma(t))
        eps = -sigma * self.score(x, t)
        return (x - sigma * eps) / alpha, eps

    def with_score_fn(self, score_fn) -> "ReverseProcess":
        """A copy of this process that calls ``score_fn`` instead (e.g. a counting wrapper)."""
        twin = copy.copy(self)
        twin.score_fn = _checks.callable_("score_fn", score_fn)
        return twin

    def ode_term(self) -> ODETerm:
        """The term ``dx/dt = drift(x, t)`` for the loop, carrying this process for transition-based solvers."""
        return ODETerm(self.drift, process=self)

    def sde_term(self) -> SDETerm:
        """The term ``dx = drift dt + s g(t) dW̄`` (additive noise), carrying this process."""
        return SDETerm(self.drift, lambda x, t: bcast(self.diffusion(t), x), additive=True, process=self)

    # torchdiffeq: dy/dt = func(t, y)
    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.drift(y, t)

    # torchsde: dy = f(tau, y) dtau + g(tau, y) dW_tau with tau = T - t
    def _unflatten(self, y):
        return y if self.event_shape is None else y.reshape(y.shape[0], *self.event_shape)

    def f(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.drift(self._unflatten(y), self.T - tau).reshape(y.shape)

    def g(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return bcast(self.diffusion(self.T - tau), y).to(y.dtype).expand(y.shape)

    def __repr__(self):
        return f"ReverseProcess({self.sde!r}, stochasticity={self.stochasticity})"
