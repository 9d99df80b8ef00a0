"""Time grids for sampling: ``steps + 1`` times decreasing from ``t_start`` to ``t_end``.

* ``"uniform"``: uniform in ``t``.
* ``"log_snr"``: uniform in ``lambda = log_snr(t)``, the natural time of exponential integrators.
* ``"karras"``: EDM's ``sigma_i = (sigma_max^(1/rho) + i/n (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
  in the noise-to-signal ratio ``sigma/alpha = exp(-lambda/2)``, with ``rho = 7``.
* ``"quadratic"``: ``t_i = t_end + (t_start - t_end)(1 - i/n)^2``, dense near the data (DDIM).
* a user tensor: strictly monotone, inside ``[0, T]``; returned in decreasing order.

:func:`discrete_time_grid` gives the grids of the discrete-time samplers (DDPM, DDIM): a
sub-sequence of the N training timesteps, ending at ``t = 0``.
"""

from __future__ import annotations

import torch

from . import _checks
from .sdes import SDE, check_sde

GRIDS = ("uniform", "log_snr", "karras", "quadratic")
SPACINGS = ("uniform", "leading", "trailing", "linspace", "quadratic")
DEFAULT_TRAIN_TIMESTEPS = 1000


def time_grid(sde: SDE, steps: int, *, grid="uniform", t_start: float | None = None, t_end: float = 1e-3,
              rho: float = 7.0, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The grid ``(steps + 1,)`` from ``t_start`` (default ``sde.T``) down to ``t_end``.

    Computed in float64 and cast to ``dtype``; the end points are exact.
    """
    check_sde(sde)
    if isinstance(grid, torch.Tensor):
        return _user_grid(sde, grid, steps).to(dtype=dtype, device=device)
    steps = _checks.positive_int("steps", steps)
    t_start = sde.T if t_start is None else _checks.real("t_start", t_start, low=0.0, high=sde.T, low_open=True)
    t_end = _checks.real("t_end", t_end, low=0.0, high=t_start, low_open=True, high_open=True)
    rho = _checks.real("rho", rho, low=0.0, low_open=True)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    if grid == "uniform":
        ts = t_start + (t_end - t_start) * u
    elif grid == "quadratic":
        ts = t_end + (t_start - t_end) * (1.0 - u) ** 2
    elif grid in ("log_snr", "karras"):
        lam_start, lam_end = sde._log_snr(ends)
        if grid == "log_snr":
            lam = lam_start + (lam_end - lam_start) * u
        else:
            s_max, s_min = torch.exp(-0.5 * lam_start), torch.exp(-0.5 * lam_end)
            sig = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
            lam = -2.0 * torch.log(sig)
        ts = sde._t_from_log_snr(lam)
    else:
        raise ValueError(f"grid must be one of {GRIDS} or a 1-D tensor of times, got {grid!r}")
    ts[0], ts[-1] = t_start, t_end
    return ts.to(dtype=dtype, device=device)


def _user_grid(sde: SDE, grid: torch.Tensor, steps) -> torch.Tensor:
    grid = _checks.float_tensor("grid", grid)
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be a 1-D tensor of at least 2 times, got shape {tuple(grid.shape)}")
    if steps is not None and _checks.positive_int("steps", steps) != grid.numel() - 1:
        raise ValueError(f"steps={steps} disagrees with the grid of {grid.numel()} times ({grid.numel() - 1} steps)")
    _checks.within("grid", grid, 0.0, sde.T)
    diffs = grid[1:] - grid[:-1]
    if bool((diffs > 0).all()):
        grid = grid.flip(0)
    elif not bool((diffs < 0).all()):
        raise ValueError("grid must be strictly monotone (times from t_start down to t_end)")
    if bool(grid[-1] <= 0):
        raise ValueError("grid must end at a time t_end > 0")
    return grid


def discrete_time_grid(sde: SDE, steps: int, *, spacing: str = "uniform", num_train_timesteps: int | None = None,
                       dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Times ``(steps + 1,)`` of ``steps`` training timesteps ``n`` (0-based, decreasing), then ``t = 0``.

    Timestep ``n`` of ``N`` sits at ``t = T (n + 1) / N``: for a VPSDE built by
    :meth:`VPSDE.from_betas` (``N`` = its number of betas) ``alpha(t)^2`` is then exactly
    ``alphas_cumprod[n]``, and the final step to ``t = 0`` uses ``alphas_cumprod = 1`` (DDPM).
    Other SDEs use ``N = num_train_timesteps`` (default 1000). Spacings, with ``c = N // steps``:

    * ``"uniform"`` (DDIM paper) = ``"leading"`` (diffusers): ``n = 0, c, 2c, ...``;
    * ``"trailing"`` (diffusers): ``round(N - i N / steps) - 1``, which includes ``n = N - 1``;
    * ``"linspace"`` (diffusers): ``round(linspace(0, N - 1, steps))``;
    * ``"quadratic"`` (DDIM paper): ``floor(linspace(0, sqrt(0.8 N), steps)^2)``.
    """
    check_sde(sde)
    N = sde.discrete_steps
    if N is None:
        N = DEFAULT_TRAIN_TIMESTEPS if num_train_timesteps is None else num_train_timesteps
        N = _checks.positive_int("num_train_timesteps", N)
    elif num_train_timesteps is not None and num_train_timesteps != N:
        raise ValueError(f"num_train_timesteps={num_train_timesteps} disagrees with the sde's {N} discrete betas")
    steps = _checks.positive_int("steps", steps)
    if steps > N:
        raise ValueError(f"steps must be <= the {N} training timesteps, got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    if spacing in ("uniform", "leading"):
        n = i * (N // steps)
    elif spacing == "trailing":
        n = torch.round(N - i * (N / steps)) - 1
    elif spacing == "linspace":
        n = torch.round(torch.linspace(0.0, N - 1, steps, dtype=torch.float64))
    elif spacing == "quadratic":
        n = torch.floor(torch.linspace(0.0, (0.8 * N) ** 0.5, steps, dtype=torch.float64) ** 2)
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    n = torch.sort(n, descending=True).values
    if steps > 1 and not bool((n[:-1] > n[1:]).all()):
        raise ValueError(f"spacing {spacing!r} repeats timesteps for steps={steps} of N={N}; use fewer steps")
    ts = torch.cat([sde.T * (n + 1) / N, torch.zeros(1, dtype=torch.float64)])
    return ts.to(dtype=dtype, device=device)
