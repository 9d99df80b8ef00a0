"""Time grids for sampling: ``steps + 1`` times decreasing from ``t_start`` to ``t_end``.

* ``"uniform"``: uniform in ``t``.
* ``"log_snr"``: uniform in ``lambda = log_snr(t)``, the natural time of exponential integrators.
* ``"karras"``: EDM's ``sigma_i = (sigma_max^(1/rho) + i/n (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
  in the noise-to-signal ratio ``sigma/alpha = exp(-lambda/2)``, with ``rho = 7``.
* ``"quadratic"``: ``t_i = t_end + (t_start - t_end)(1 - i/n)^2``, dense near the data (DDIM).
* a user tensor: strictly monotone, inside ``[0, T]``; returned in decreasing order.
"""

from __future__ import annotations

import torch

from . import _checks
from .sdes import SDE

GRIDS = ("uniform", "log_snr", "karras", "quadratic")


def time_grid(sde: SDE, steps: int, *, grid="uniform", t_start: float | None = None, t_end: float = 1e-3,
              rho: float = 7.0, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The grid ``(steps + 1,)`` from ``t_start`` (default ``sde.T``) down to ``t_end``.

    Computed in float64 and cast to ``dtype``; the end points are exact.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdediff SDE, got {type(sde).__name__}")
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
