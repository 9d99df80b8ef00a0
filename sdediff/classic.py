"""The classic samplers, written as what they are: solvers of the reverse SDE or the probability-flow ODE.

* :func:`sample_ddpm`: DDPM ancestral sampling = the ``"ancestral"`` solver of the reverse SDE.
* :func:`sample_ddim`: DDIM = the ``"ddim"`` exponential-Euler step of the probability-flow ODE
  (``eta = 0``) or the ``"ancestral"`` step of the reverse process with stochasticity ``eta``.
* :func:`sample_ald`: NCSN's annealed Langevin dynamics = a corrector-only run at geometric levels.
* :func:`sample_pc`: predictor–corrector sampling (Song et al. 2021).

All run in :func:`sdediff.integrate` and return its :class:`~sdediff.Solution` (``nfe`` counts
score calls). ``score_fn`` is any score function, e.g. a discrete-time network wrapped by
:func:`sdediff.discrete_score_fn` or :func:`sdediff.from_diffusers`.
"""

from __future__ import annotations

import math

import torch

from . import _checks
from ._tensors import time_dtype
from .grids import DEFAULT_TRAIN_TIMESTEPS, discrete_time_grid
from .models import LearnedVariance
from .reverse import ReverseProcess
from .sampling import _prepare, _run, _start
from .sdes import VESDE
from .solvers.base import get_solver
from .solvers.langevin import AnnealedLangevin, Corrector, LangevinCorrector
from .solvers.transition import DDIM, Ancestral


def sample_ddpm(score_fn, sde, x, *, steps: int | None = None, variance: str | None = None, clip_x0: float | None = None,
                spacing: str = "leading", num_train_timesteps: int | None = None, generator=None, brownian=None,
                return_trajectory: bool = False, progress: bool = False, device=None, dtype=None):
    """DDPM ancestral sampling (Ho et al. 2020) over ``steps`` training timesteps (default: all ``N``).

    ``x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(1 - beta_t) + sigma_t z``, written as the
    posterior mean ``sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(1 - beta_t)(1 - abar_{t-1}) / (1 - abar_t) x_t``
    through the predicted ``x0`` (clipped to ``[-clip_x0, clip_x0]`` if asked), with
    ``sigma_t^2 = beta_t`` (``variance="beta"``, the default) or the posterior ``beta~_t``
    (``"posterior"``); a :class:`sdediff.LearnedVariance` ``score_fn`` samples with its learned
    variance ``exp(frac log beta_t + (1 - frac) log beta~_t)`` unless ``variance`` is given.
    With fewer steps than ``N`` the step ``t -> s`` uses ``beta = 1 - abar_t / abar_s`` (as
    diffusers). Timesteps are placed by :func:`sdediff.discrete_time_grid` (``spacing``,
    ``num_train_timesteps``); the last step lands on ``t = 0`` and adds no noise.
    """
    x, monitor = _start(score_fn, sde, x, generator, device, dtype)
    ts = discrete_time_grid(sde, _default_steps(sde, steps, num_train_timesteps), spacing=spacing,
                            num_train_timesteps=num_train_timesteps, dtype=time_dtype(x.dtype), device=x.device)
    if variance is None:
        variance = score_fn if isinstance(score_fn, LearnedVariance) else "beta"
    solver = Ancestral(variance, clip_x0, eps_from_clipped_x0=True)
    return _run(ReverseProcess(sde, monitor, 1.0).sde_term(), x, ts, monitor, solver=solver, brownian=brownian,
                generator=generator, noise_free_last_step=True, return_trajectory=return_trajectory, progress=progress)


def sample_ddim(score_fn, sde, x, *, steps: int = 50, eta: float = 0.0, spacing: str = "uniform",
                num_train_timesteps: int | None = None, clip_x0: float | None = None, eps_from_clipped_x0: bool = False,
                generator=None, brownian=None, return_trajectory: bool = False, progress: bool = False,
                device=None, dtype=None):
    """DDIM (Song, Meng & Ermon 2021): ``x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z``.

    ``c = eta sigma_s sqrt(1 - r)`` with ``r = exp(lambda_t - lambda_s)``: ``eta = 0`` is
    deterministic (no random draws) and ``eta = 1`` has DDPM's posterior variance. ``steps``
    timesteps by ``spacing`` (see :func:`sdediff.discrete_time_grid`), ending at ``t = 0``;
    ``clip_x0`` clips the predicted ``x0``, and ``eps_from_clipped_x0`` recomputes ``eps`` from it
    (diffusers' ``use_clipped_model_output``). Works for VP, sub-VP and VE SDEs.
    """
    eta = _checks.real("eta", eta, low=0.0)
    x, monitor = _start(score_fn, sde, x, generator, device, dtype)
    ts = discrete_time_grid(sde, steps, spacing=spacing, num_train_timesteps=num_train_timesteps,
                            dtype=time_dtype(x.dtype), device=x.device)
    process = ReverseProcess(sde, monitor, eta)
    if eta == 0.0:
        return _run(process.ode_term(), x, ts, monitor, solver=DDIM(clip_x0, eps_from_clipped_x0),
                    return_trajectory=return_trajectory, progress=progress)
    return _run(process.sde_term(), x, ts, monitor, solver=Ancestral("posterior", clip_x0, eps_from_clipped_x0),
                brownian=brownian, generator=generator, noise_free_last_step=True,
                return_trajectory=return_trajectory, progress=progress)


def sample_ald(score_fn, sde: VESDE, x, *, levels=10, steps_per_level: int = 100, step_ratio: float = 2e-5,
               generator=None, return_trajectory: bool = False, progress: bool = False, device=None, dtype=None):
    """NCSN annealed Langevin dynamics (Song & Ermon 2019) on a :class:`VESDE` score.

    For noise levels ``sigma_1 > ... > sigma_L`` (``levels``: a count, geometric from
    ``sde.sigma_max`` to ``sde.sigma_min``, or a decreasing 1-D tensor of sigmas in that range),
    ``steps_per_level`` updates ``x <- x + (a_i / 2) score(x, sigma_i) + sqrt(a_i) z`` with
    ``a_i = step_ratio sigma_i^2 / sigma_L^2``. Returns samples of the data convolved with
    ``N(0, sigma_L^2)``, approximately: Langevin with a finite step is biased, and with few levels
    the chains do not cross between well-separated modes, so mode weights can be off (on the 2-D
    test mixtures, 10 levels gave a 0.30 mode 0.345; 20 levels, 0.317). ``return_trajectory``
    gives the state after each level.
    """
    if not isinstance(sde, VESDE):
        raise TypeError(f"sample_ald needs a VESDE (NCSN's noise levels), got {type(sde).__name__}")
    _checks.positive_int("steps_per_level", steps_per_level)
    x, monitor = _start(score_fn, sde, x, generator, device, dtype)
    sigmas = _levels(sde, levels)
    ts = (torch.log(sigmas / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)).clamp(0.0, sde.T)
    ts = ts.to(dtype=time_dtype(x.dtype), device=x.device)
    corrector = AnnealedLangevin(step_ratio, float(sigmas[-1]), steps_per_level)
    return _run(ReverseProcess(sde, monitor, 1.0).sde_term(), x, ts, monitor, solver=None, corrector=corrector,
                generator=generator, return_trajectory=return_trajectory, progress=progress)


def _levels(sde: VESDE, levels) -> torch.Tensor:
    if isinstance(levels, torch.Tensor):
        sigmas = _checks.float_tensor("levels", levels).detach().to(torch.float64).cpu()
        if sigmas.dim() != 1 or sigmas.numel() < 2 or not bool((sigmas[1:] < sigmas[:-1]).all()):
            raise ValueError("levels must be a count or a strictly decreasing 1-D tensor of at least 2 sigmas")
        lo, hi = sde.sigma_min, sde.sigma_max
        if bool(((sigmas < lo * (1 - 1e-6)) | (sigmas > hi * (1 + 1e-6))).any()):  # slack for float32 input
            raise ValueError(f"levels must lie in [{lo:g}, {hi:g}] (sde.sigma_min, sde.sigma_max), "
                             f"got {sigmas.min().item():g} .. {sigmas.max().item():g}")
        return sigmas
    n = _checks.positive_int("levels", levels)
    if n < 2:
        raise ValueError(f"levels must be >= 2, got {n}")
    return torch.exp(torch.linspace(math.log(sde.sigma_max), math.log(sde.sigma_min), n, dtype=torch.float64))


def sample_pc(score_fn, sde, x, *, steps: int = 1000, predictor="reverse_diffusion", corrector="langevin",
              snr: float = 0.16, n_corrector_steps: int = 1, t_start: float | None = None, t_end: float | None = None,
              grid="uniform", generator=None, brownian=None, noise_free_last_step: bool = True,
              return_trajectory: bool = False, progress: bool = False, device=None, dtype=None):
    """Predictor–corrector sampling (Song et al. 2021) of the reverse SDE, for VP, sub-VP and VE SDEs.

    At each grid time, ``n_corrector_steps`` Langevin steps with signal-to-noise ratio ``snr``
    (see :class:`~sdediff.solvers.LangevinCorrector`), then one predictor step: an SDE solver by
    name (``"reverse_diffusion"``, ``"euler_maruyama"``, ``"ancestral"``, ...) or instance. Either
    may be ``None`` (predictor-only, or corrector-only). ``corrector`` may also be a
    :class:`~sdediff.solvers.Corrector` instance. Grid arguments as in :func:`sdediff.sample_sde`;
    the last predictor step is noise-free by default, as score_sde's.
    """
    _checks.positive_int("n_corrector_steps", n_corrector_steps)
    if predictor is not None:
        predictor = get_solver(predictor, "sde")
    if corrector == "langevin":
        corrector = LangevinCorrector(snr, n_corrector_steps)
    elif corrector is not None and not isinstance(corrector, Corrector):
        raise ValueError(f"corrector must be 'langevin', a Corrector instance or None, got {corrector!r}")
    if predictor is None and corrector is None:
        raise ValueError("predictor and corrector cannot both be None")
    x, ts, monitor = _prepare(score_fn, sde, x, predictor, steps, steps, t_start, t_end, grid, generator, device, dtype)
    return _run(ReverseProcess(sde, monitor, 1.0).sde_term(), x, ts, monitor, solver=predictor, corrector=corrector,
                brownian=brownian, generator=generator, noise_free_last_step=noise_free_last_step,
                return_trajectory=return_trajectory, progress=progress)


def _default_steps(sde, steps, num_train_timesteps):
    if steps is not None:
        return steps
    n = sde.discrete_steps
    return n if n is not None else (num_train_timesteps or DEFAULT_TRAIN_TIMESTEPS)

