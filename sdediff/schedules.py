"""Noise schedules of variance-preserving processes: ``beta(t)`` and ``log alpha(t)`` in one object.

A schedule fixes the signal coefficient ``alpha(t) = exp(-1/2 int_0^t beta(s) ds)`` of the VP and
sub-VP SDEs. Each schedule gives ``beta(t)``, ``log_alpha(t)`` and its inverse
``t_from_log_alpha``, all in closed form (or exact piecewise-linear form for discrete schedules),
so log-SNR grids and exponential integrators never need a root finder.

Methods here do not validate ``t``; the SDEs that own a schedule do.
"""

from __future__ import annotations

import math

import torch

from . import _checks
from ._tensors import moved, time_dtype


class Schedule:
    """Base class. ``T`` is the largest time at which the schedule is used."""

    T: float = 1.0

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t_from_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def discrete_betas(self, n: int) -> torch.Tensor:
        """The betas of an ``n``-step DDPM discretization, float64, ``(n,)``."""
        raise NotImplementedError


class LinearSchedule(Schedule):
    """``beta(t) = beta_min + t (beta_max - beta_min)`` (DDPM, score_sde).

    ``log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = _checks.real("beta_min", beta_min, low=0.0)
        self.beta_max = _checks.real("beta_max", beta_max, low=0.0, low_open=True)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min = {self.beta_min}, got {self.beta_max}")

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_from_log_alpha(self, log_alpha):
        # Solve beta_min t + (beta_max - beta_min) t^2 / 2 = c in the cancellation-free form
        # (0/0 at c = 0 when beta_min = 0, hence the where).
        c = -2.0 * log_alpha
        d = self.beta_max - self.beta_min
        denom = self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * d * c)
        zero = c == 0
        return torch.where(zero, torch.zeros_like(c), 2.0 * c / torch.where(zero, 1.0, denom))

    def discrete_betas(self, n):
        # DDPM's discrete betas: linspace(beta_min / N, beta_max / N, N).
        if self.beta_max / n >= 1.0:
            raise ValueError(f"N must exceed beta_max = {self.beta_max} so that every beta_max / N < 1, got {n}")
        return torch.linspace(self.beta_min / n, self.beta_max / n, n, dtype=torch.float64)

    def __repr__(self):
        return f"LinearSchedule(beta_min={self.beta_min}, beta_max={self.beta_max})"


class CosineSchedule(Schedule):
    """Improved-DDPM cosine schedule in continuous time (Nichol & Dhariwal, 2021).

    ``alpha(t)^2 = f(t) / f(0)`` with ``f(t) = cos^2(pi/2 (t + s) / (1 + s))``, so
    ``beta(t) = pi / (1 + s) tan(pi/2 (t + s) / (1 + s))``. ``beta`` diverges at t=1; as iDDPM
    clips its discrete betas at 0.999 near the end, the continuous process is clipped in time at
    ``T = 0.9946`` (DPM-Solver's choice), where ``beta(T) ~ 370`` and log-SNR ~ -9.5, close to
    the linear schedule's -10.0 at t=1.
    """

    def __init__(self, s: float = 0.008, T: float = 0.9946):
        self.s = _checks.real("s", s, low=0.0, low_open=True, high=1.0)
        self.T = _checks.real("T", T, low=0.0, high=1.0, low_open=True, high_open=True)
        self._angle0 = 0.5 * math.pi * self.s / (1.0 + self.s)
        self._cos0 = math.cos(self._angle0)

    def _angle(self, t):
        return 0.5 * math.pi * (t + self.s) / (1.0 + self.s)

    def beta(self, t):
        return math.pi / (1.0 + self.s) * torch.tan(self._angle(t))

    def log_alpha(self, t):
        # log(cos a / cos a0) = log1p(-2 sin((a + a0)/2) sin((a - a0)/2) / cos a0): no cancellation
        # at small t, where 1 - alpha^2 (hence sigma) is what matters.
        a, a0 = self._angle(t), self._angle0
        return torch.log1p(-2.0 * torch.sin(0.5 * (a + a0)) * torch.sin(0.5 * (a - a0)) / self._cos0)

    def t_from_log_alpha(self, log_alpha):
        # a - a0 from tan(a - a0), written with 1 - alpha^2 so it stays accurate as t -> 0
        # (arccos(alpha cos a0) loses digits there): cos a = alpha cos a0.
        alpha = torch.exp(log_alpha)
        one_minus = -torch.expm1(2.0 * log_alpha)
        sin0, cos0 = math.sin(self._angle0), self._cos0
        sin_a = torch.sqrt(sin0**2 + cos0**2 * one_minus)
        delta = torch.atan2(cos0 * one_minus / (sin_a + alpha * sin0), alpha * cos0**2 + sin0 * sin_a)
        return delta * (2.0 * (1.0 + self.s) / math.pi)

    def discrete_betas(self, n):
        # iDDPM: alphas_cumprod from f(n/N) / f(0) over the full [0, 1], betas clipped at 0.999.
        t = torch.arange(n + 1, dtype=torch.float64) / n
        abar = torch.exp(2.0 * self.log_alpha(t))
        return (1.0 - abar[1:] / abar[:-1]).clamp(max=0.999)

    def __repr__(self):
        return f"CosineSchedule(s={self.s}, T={self.T})"


class DiscreteSchedule(Schedule):
    """A schedule given by the N discrete betas of a DDPM-style model.

    Step ``n = 1..N`` sits at ``t_n = n / N`` and ``log alpha(t)`` interpolates
    ``1/2 log alphas_cumprod[n]`` linearly between the knots (with ``log alpha(0) = 0``), so
    ``beta(t) = -N log(1 - beta_n)`` on ``(t_{n-1}, t_n]``, which is ``N beta_n`` to first order.
    """

    def __init__(self, betas):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a 1-D sequence of length >= 1, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        self.betas = betas
        self.N = betas.numel()
        log_abar = torch.cumsum(torch.log1p(-betas), 0)
        self._t_knots = torch.arange(self.N + 1, dtype=torch.float64) / self.N
        self._log_alpha_knots = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * log_abar])
        self._beta_pieces = -self.N * torch.log1p(-betas)
        self._on_device: dict = {}

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "DiscreteSchedule":
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return cls(1.0 - abar / prev)

    def _knots(self, like):
        """``(t_knots, log_alpha_knots, beta_pieces)`` on ``like``'s device and dtype."""
        return moved(self._on_device, like, (self._t_knots, self._log_alpha_knots, self._beta_pieces))

    def beta(self, t):
        # beta_n on (n/N, (n+1)/N]; a time a few ulps above a knot (the float32 timestep (n+1)/N
        # times N) counts as the knot, so a reverse step from it reads its own interval's beta
        tn = t.to(time_dtype(t.dtype)) * self.N  # (a half-precision t is already rounded: no tolerance of its ulps)
        idx = torch.clamp(torch.ceil(tn - 4.0 * torch.finfo(tn.dtype).eps * tn.abs()).long() - 1, 0, self.N - 1)
        # take, not [idx]: a 0-d index tensor would be read as a Python int (a host sync, and
        # torch.compile cannot trace it)
        return torch.take(self._knots(t)[2], idx)

    def log_alpha(self, t):
        tk, lk, _ = self._knots(t)
        return _interp(t, tk, lk)

    def t_from_log_alpha(self, log_alpha):
        tk, lk, _ = self._knots(log_alpha)
        return _interp(log_alpha, lk.flip(0), tk.flip(0))

    def discrete_betas(self, n):
        if n == self.N:
            return self.betas.clone()
        t = torch.arange(n + 1, dtype=torch.float64) / n
        return -torch.expm1(2.0 * (self.log_alpha(t[1:]) - self.log_alpha(t[:-1])))

    def __repr__(self):
        return f"DiscreteSchedule(N={self.N})"


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of knots ``(xp, fp)``, ``xp`` increasing; linear extrapolation."""
    idx = torch.clamp(torch.searchsorted(xp, x.detach().contiguous()), 1, xp.numel() - 1)
    x0, x1 = torch.take(xp, idx - 1), torch.take(xp, idx)
    f0, f1 = torch.take(fp, idx - 1), torch.take(fp, idx)
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


def make_schedule(schedule, beta_min: float, beta_max: float) -> Schedule:
    if isinstance(schedule, Schedule):
        return schedule
    if schedule == "linear":
        return LinearSchedule(beta_min, beta_max)
    if schedule == "cosine":
        LinearSchedule(beta_min, beta_max)  # unused by the cosine schedule, but still validated
        return CosineSchedule()
    raise ValueError(f"schedule must be 'linear', 'cosine' or a Schedule instance, got {schedule!r}")
