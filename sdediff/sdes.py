"""Forward diffusion processes ``dx = f(t) x dt + g(t) dW`` with Gaussian marginals.

Every process here is linear in ``x``, so ``x_t = alpha(t) x_0 + sigma(t) eps`` in closed form and
the log signal-to-noise ratio ``log_snr(t) = 2 log(alpha / sigma)`` is invertible in closed form.

Conventions: ``x`` is ``(batch, *dims)``; ``t`` is a float tensor of shape ``(batch,)`` or a
0-d tensor or Python float (broadcast over the batch). Results take the dtype and device of ``x``
(or of ``t`` where there is no ``x``; float64 for a Python float). Public methods validate ``t``;
the underscored primitives (``_drift_coef``, ``_g2``, ``_alpha_sigma``, ``_log_snr``,
``_t_from_log_snr``) do not, and are what integration loops call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _checks
from .schedules import DiscreteSchedule, Schedule, make_schedule


def bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-sample coefficient ``(batch,)`` so it broadcasts against ``x``; a 0-d one is returned as it is.

    A 0-d coefficient broadcasts already, and, unlike a ``(1, ..., 1)`` view, does not promote
    ``x`` in type promotion: float32 times (see ``time_dtype``) keep a bfloat16 state bfloat16.
    """
    return c if c.dim() == 0 else c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


def check_sde(sde) -> "SDE":
    """``sde`` itself if it is an sdediff SDE; else a ``TypeError`` naming the argument (one check for every entry point)."""
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdediff SDE (VPSDE, SubVPSDE, VESDE, EDMSDE, ...), got {type(sde).__name__}")
    return sde


class SDE:
    """A forward SDE on ``[0, T]`` with drift ``f(t) x``, diffusion ``g(t)`` and prior ``N(0, prior_std^2 I)``."""

    T: float = 1.0
    prior_std: float = 1.0
    discrete_steps: int | None = None  # N for a process built from N discrete betas (DDPM timesteps)

    # -- primitives implemented by each process (t: tensor; no validation) --------------------
    def _drift_coef(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _f_g2(self, t: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(f(t), g(t)^2)`` for a sampling step: ``f`` is None where the drift is zero (no work for it).

        Each of these is a separate small kernel per step (several microseconds on a CPU);
        overrides share the schedule's evaluation between the two. A subclass that redefines
        ``_drift_coef`` or ``_g2`` without this gets this generic pair back (``__init_subclass__``).
        """
        return self._drift_coef(t), self._g2(t)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A fused shortcut defined further up the MRO than f or g^2 (by a parent, past a mixin)
        # would silently ignore them.

        def owner(name):
            return next(i for i, c in enumerate(cls.__mro__) if name in vars(c))

        if owner("_f_g2") > min(owner("_drift_coef"), owner("_g2")):
            cls._f_g2 = SDE._f_g2

    def _log_snr(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(t)
        return 2.0 * (torch.log(alpha) - torch.log(sigma))

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- validated public API -----------------------------------------------------------------
    def _time(self, t, like: torch.Tensor | None = None, name: str = "t") -> torch.Tensor:
        """``t`` as a tensor in ``like``'s dtype and device, checked to lie in ``[0, T]``."""
        dtype = like.dtype if like is not None else None
        device = like.device if like is not None else None
        if isinstance(t, torch.Tensor):
            _checks.float_tensor(name, t)
            if t.dim() > 1:
                raise ValueError(f"{name} must be a float, a 0-d tensor or a tensor of shape (batch,), got {tuple(t.shape)}")
            if like is not None and t.dim() == 1 and t.shape[0] not in (1, like.shape[0]):
                raise ValueError(f"{name} has shape {tuple(t.shape)} but x has batch size {like.shape[0]}")
            _checks.within(name, t, 0.0, self.T)
            return t.to(dtype=dtype or t.dtype, device=device or t.device)
        value = _checks.real(name, t, low=0.0, high=self.T)
        # A Python float carries double precision; keep it (0-d results do not upcast batched x).
        return torch.tensor(value, dtype=dtype or torch.float64, device=device)

    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        """``f(x, t) = f(t) x``, shape of ``x``."""
        x = _checks.batched("x", x)
        t = self._time(t, x)
        return bcast(self._drift_coef(t), x) * x

    def diffusion(self, t) -> torch.Tensor:
        """``g(t)``, shape of ``t``."""
        return torch.sqrt(self._g2(self._time(t)))

    def marginal(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha(t), sigma(t))`` with ``x_t = alpha x_0 + sigma eps``; each of the shape of ``t``."""
        return self._alpha_sigma(self._time(t))

    def marginal_prob(self, x0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``alpha(t) x0`` (shape of ``x0``) and std ``sigma(t)`` (shape of ``t``) of ``p(x_t | x_0)``."""
        x0 = _checks.batched("x0", x0)
        alpha, sigma = self._alpha_sigma(self._time(t, x0))
        return bcast(alpha, x0) * x0, sigma

    def perturb(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = alpha(t) x0 + sigma(t) noise``."""
        x0 = _checks.batched("x0", x0)
        if not isinstance(noise, torch.Tensor) or noise.shape != x0.shape:
            raise ValueError(f"noise must be a tensor of the shape of x0 {tuple(x0.shape)}")
        alpha, sigma = self._alpha_sigma(self._time(t, x0))
        return bcast(alpha, x0) * x0 + bcast(sigma, x0) * noise

    def log_snr(self, t) -> torch.Tensor:
        """``lambda(t) = 2 log(alpha(t) / sigma(t))``, decreasing in ``t``."""
        return self._log_snr(self._time(t))

    def t_from_log_snr(self, lam) -> torch.Tensor:
        """Inverse of :meth:`log_snr`; ``lam`` must lie in ``[log_snr(T), log_snr(0)]``."""
        if not isinstance(lam, torch.Tensor):
            lam = torch.tensor(_checks.real("lam", lam, low=-math.inf), dtype=torch.float64)
        _checks.float_tensor("lam", lam)
        t = self._t_from_log_snr(lam)
        tol = 1e-5 * self.T
        bad = torch.isnan(t) | (t < -tol) | (t > self.T + tol)
        if bool(bad.any()):
            lo = self._log_snr(torch.tensor(self.T, dtype=torch.float64)).item()
            hi = self._log_snr(torch.tensor(0.0, dtype=torch.float64)).item()
            raise ValueError(f"lam must lie in [{lo:.6g}, {hi:.6g}] (log_snr(T), log_snr(0)), got {lam[bad].flatten()[0].item():g}")
        return t.clamp(0.0, self.T)

    def prior_sample(self, shape, *, generator=None, device=None, dtype=None) -> torch.Tensor:
        """A draw from the prior ``N(0, prior_std^2 I)`` of shape ``(batch, *dims)``."""
        shape = tuple(shape)
        if len(shape) < 1 or any(not isinstance(n, int) or n < 1 for n in shape):
            raise ValueError(f"shape must be a tuple of positive ints (batch, *dims), got {shape}")
        return self.prior_std * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """``log N(z; 0, prior_std^2 I)`` summed over ``dims``, shape ``(batch,)``."""
        z = _checks.batched("z", z)
        d = z[0].numel()
        sq = (z / self.prior_std).pow(2).reshape(z.shape[0], -1).sum(1)
        return -0.5 * sq - 0.5 * d * math.log(2.0 * math.pi * self.prior_std**2)

    def reverse(self, score_fn, stochasticity: float = 1.0, *, event_shape=None, sde_type: str = "ito"):
        """The reverse-time process ``dx = [f - (1+s^2)/2 g^2 score] dt + s g dW`` (see :class:`ReverseProcess`).

        ``event_shape`` and ``sde_type`` configure its torchsde interface.
        """
        from .reverse import ReverseProcess

        return ReverseProcess(self, score_fn, stochasticity, event_shape=event_shape, sde_type=sde_type)

    def probability_flow(self, score_fn):
        """The probability-flow ODE ``dx/dt = f - 1/2 g^2 score`` (``reverse`` with s=0)."""
        return self.reverse(score_fn, 0.0)


class _ScheduledSDE(SDE):
    """Shared by VP and sub-VP: drift ``-beta(t) x / 2`` with ``alpha(t)`` from a :class:`Schedule`."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, schedule="linear"):
        self.schedule: Schedule = make_schedule(schedule, beta_min, beta_max)
        self.T = self.schedule.T

    def _drift_coef(self, t):
        return -0.5 * self.schedule.beta(t)

    @property
    def discrete_steps(self) -> int | None:
        return getattr(self.schedule, "N", None)

    def __repr__(self):
        return f"{type(self).__name__}(schedule={self.schedule!r})"


class DDPMDiscretization(NamedTuple):
    """The N-step DDPM quantities, float64 tensors of shape ``(N,)``."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor


class VPSDE(_ScheduledSDE):
    """Variance-preserving SDE (DDPM): ``dx = -beta(t) x / 2 dt + sqrt(beta(t)) dW``.

    ``alpha(t) = exp(-1/2 int_0^t beta)``, ``sigma(t) = sqrt(1 - alpha^2)``. ``schedule`` is
    ``"linear"`` (``beta_min``, ``beta_max``), ``"cosine"`` (iDDPM; the beta arguments are unused)
    or a :class:`~sdediff.schedules.Schedule`. Use :meth:`from_betas` for a discrete-time model.
    """

    def _g2(self, t):
        return self.schedule.beta(t)

    def _f_g2(self, t):
        beta = self.schedule.beta(t)
        return -0.5 * beta, beta

    def _alpha_sigma(self, t):
        log_alpha = self.schedule.log_alpha(t)
        # clamp: rounding may put alpha a hair above 1 at t = 0
        return torch.exp(log_alpha), torch.sqrt((-torch.expm1(2.0 * log_alpha)).clamp(min=0.0))

    def _log_snr(self, t):
        log_alpha = self.schedule.log_alpha(t)
        return 2.0 * log_alpha - torch.log(-torch.expm1(2.0 * log_alpha))

    def _t_from_log_snr(self, lam):
        # alpha^2 = sigmoid(lam)  =>  log alpha = -softplus(-lam) / 2
        return self.schedule.t_from_log_alpha(-0.5 * torch.nn.functional.softplus(-lam))

    @classmethod
    def from_betas(cls, betas) -> "VPSDE":
        """The VPSDE whose ``alpha(n/N)^2`` equals the ``alphas_cumprod`` of the given N discrete betas."""
        return cls(schedule=DiscreteSchedule(betas))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "VPSDE":
        return cls(schedule=DiscreteSchedule.from_alphas_cumprod(alphas_cumprod))

    def discretize(self, N: int) -> DDPMDiscretization:
        """The DDPM ``betas``, ``alphas`` and ``alphas_cumprod`` of N steps.

        Linear: ``betas = linspace(beta_min/N, beta_max/N, N)`` (Ho et al., score_sde); cosine:
        iDDPM's betas clipped at 0.999; discrete: the given betas when N matches.
        """
        N = _checks.positive_int("N", N)
        betas = self.schedule.discrete_betas(N)
        return DDPMDiscretization(betas, 1.0 - betas, torch.cumprod(1.0 - betas, 0))


class SubVPSDE(_ScheduledSDE):
    """Sub-VP SDE (Song et al. 2021): ``dx = -beta x / 2 dt + sqrt(beta (1 - alpha^4)) dW``.

    Same ``alpha(t)`` as :class:`VPSDE`, smaller noise: ``sigma(t) = 1 - alpha(t)^2``.
    """

    def _g2(self, t):
        return self.schedule.beta(t) * -torch.expm1(4.0 * self.schedule.log_alpha(t))

    def _f_g2(self, t):
        beta = self.schedule.beta(t)
        return -0.5 * beta, beta * -torch.expm1(4.0 * self.schedule.log_alpha(t))

    def _alpha_sigma(self, t):
        log_alpha = self.schedule.log_alpha(t)
        return torch.exp(log_alpha), (-torch.expm1(2.0 * log_alpha)).clamp(min=0.0)

    def _log_snr(self, t):
        log_alpha = self.schedule.log_alpha(t)
        return 2.0 * (log_alpha - torch.log(-torch.expm1(2.0 * log_alpha)))

    def _t_from_log_snr(self, lam):
        # alpha / (1 - alpha^2) = exp(lam/2)  =>  log alpha = -asinh(exp(-lam/2) / 2)
        return self.schedule.t_from_log_alpha(-torch.asinh(0.5 * torch.exp(-0.5 * lam)))


class VESDE(SDE):
    """Variance-exploding SDE (NCSN): ``dx = sigma(t) sqrt(2 log(sigma_max/sigma_min)) dW``.

    ``alpha = 1`` and ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, geometric as in NCSN.
    As in score_sde, time 0 carries noise ``sigma_min`` (the marginal of the SDE started from
    the data at ``t = -inf``); the prior is ``N(0, sigma_max^2 I)``.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min = _checks.real("sigma_min", sigma_min, low=0.0, low_open=True)
        self.sigma_max = _checks.real("sigma_max", sigma_max, low=0.0, low_open=True)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min = {self.sigma_min}, got {self.sigma_max}")
        self.T = 1.0
        self.prior_std = self.sigma_max
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _log_sigma(self, t):
        return math.log(self.sigma_min) + t * self._log_ratio

    def _drift_coef(self, t):
        return torch.zeros_like(t)

    def _g2(self, t):
        return 2.0 * self._log_ratio * torch.exp(2.0 * self._log_sigma(t))

    def _f_g2(self, t):
        return None, self._g2(t)

    def _alpha_sigma(self, t):
        return torch.ones_like(t), torch.exp(self._log_sigma(t))

    def _log_snr(self, t):
        return -2.0 * self._log_sigma(t)

    def _t_from_log_snr(self, lam):
        return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio

    def __repr__(self):
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class EDMSDE(SDE):
    """The variance-exploding SDE ``dx = sqrt(2t) dW`` of EDM and consistency models (Karras et al. 2022).

    ``alpha = 1`` and ``sigma(t) = t``: time is the noise level, ``t`` in ``[0, sigma_max]``, and
    the probability-flow ODE is ``dx/dt = -t score = (x - x0_hat) / t``. The prior is
    ``N(0, sigma_max^2 I)``; sample down to ``t_end = 0.002`` (EDM's ``sigma_min``).
    """

    def __init__(self, sigma_max: float = 80.0):
        self.sigma_max = _checks.real("sigma_max", sigma_max, low=0.0, low_open=True)
        self.T = self.sigma_max
        self.prior_std = self.sigma_max

    def _drift_coef(self, t):
        return torch.zeros_like(t)

    def _g2(self, t):
        return 2.0 * t

    def _f_g2(self, t):
        return None, self._g2(t)

    def _alpha_sigma(self, t):
        return torch.ones_like(t), t

    def _log_snr(self, t):
        return -2.0 * torch.log(t)

    def _t_from_log_snr(self, lam):
        return torch.exp(-0.5 * lam)

    def __repr__(self):
        return f"EDMSDE(sigma_max={self.sigma_max})"
