"""Inpainting by replacement, with RePaint's resampling (Lugmayr et al. 2022).

After every step of a reverse-time sampler the known region is replaced by the known data
noised to the same level, ``x <- m * (alpha(t) x_known + sigma(t) z) + (1 - m) * x``.
Replacement alone is approximate: the unknown region sees the known one only through the score
of later steps, often after its mode has been chosen. RePaint's resampling lets the two regions
harmonize: after each block of ``j`` steps the whole state is noised forward ``j`` steps with the
exact kernel ``x_s = (alpha_s / alpha_t) x_t + sqrt(sigma_s^2 - (alpha_s / alpha_t)^2 sigma_t^2) z``
and denoised again, ``r`` times in all.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import _checks
from .integrate import Solution
from .reverse import ReverseProcess
from .sampling import _prepare, _run
from .solvers.base import Solver, available_solvers, get_solver
from .solvers.external import TorchdiffeqSolver, TorchsdeSolver

DEFAULT_INPAINT_STEPS = 250


def _any_solver(solver) -> Solver:
    """A single-step solver of either kind, by name or instance."""
    if isinstance(solver, str) and solver in available_solvers("ode"):
        solver = get_solver(solver, "ode")
    elif isinstance(solver, Solver):
        solver = get_solver(solver, solver.kind)
    elif isinstance(solver, str) and solver not in available_solvers("sde"):
        raise ValueError(f"unknown solver {solver!r}; valid: the single-step names of available_solvers()")
    else:
        solver = get_solver(solver, "sde")
    if solver.multistep or isinstance(solver, (TorchdiffeqSolver, TorchsdeSolver)):
        raise ValueError(f"solver {solver.name!r} cannot inpaint: the state is replaced after every step, so the "
                         "solver must take single fixed steps in sdediff's loop (e.g. 'ancestral', "
                         "'euler_maruyama', 'ddim', 'heun', 'dpm_solver_2')")
    return solver


def _known_and_mask(known, mask, x: torch.Tensor):
    known = _checks.float_tensor("known", known)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor (True or 1 where known), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be boolean or hold only 0 and 1 (1 where the data is known)")
        mask = mask != 0
    for name, value in (("known", known), ("mask", mask)):
        try:
            fits = torch.broadcast_shapes(value.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to x {tuple(x.shape)}")
    return known.to(device=x.device, dtype=x.dtype), mask.to(x.device)


def sample_inpaint(score_fn, sde, x, *, known, mask, steps: int | None = None, jump_length: int = 10,
                   resample: int = 10, solver="ancestral", stochasticity: float = 1.0, grid=None,
                   t_start: float | None = None, t_end: float | None = None, generator=None,
                   return_trajectory: bool = False, progress: bool = False, device=None, dtype=None) -> Solution:
    """Sample the unknown region given ``known`` data where ``mask`` is set (RePaint).

    ``x``: the initial state at ``t_start`` (or a shape, drawn from the prior), ``(batch, *dims)``;
    ``known`` and ``mask`` (bool, or 0/1 with 1 where known) broadcast to it. ``steps`` (default
    250) steps of ``grid`` (see :func:`sdediff.sample_sde`; a tensor such as
    ``discrete_time_grid(sde, 250)`` gives DDPM's timesteps), in blocks of ``jump_length`` steps,
    each traversed ``resample`` times (``resample=1``: replacement only; RePaint uses ``j = r = 10``).
    ``solver``: any single-step SDE solver (``"ancestral"``, DDPM-style, by default; with
    ``stochasticity``) or ODE solver (``"ddim"``, ``"heun"``, ...). About ``steps * resample``
    steps in all. The known region of the result equals ``known`` exactly.

    Returns a :class:`~sdediff.Solution` with ``nfe``; with ``return_trajectory``, ``ts`` holds
    the visited times in order (they go back up at each jump) and ``xs`` the states there.
    """
    solver = _any_solver(solver)
    j = _checks.positive_int("jump_length", jump_length)
    r = _checks.positive_int("resample", resample)
    to_zero = isinstance(grid, torch.Tensor) and grid.dim() == 1 and grid.numel() > 2 and bool(grid.min() == 0)
    if to_zero:  # a DDPM-style grid (discrete_time_grid) ends at t = 0, where the score is not defined
        if solver.evals_per_step != 1:
            raise ValueError(f"a grid ending at t = 0 needs a solver that evaluates the score only at the start of "
                             f"its step ('ancestral', 'ddim', 'euler_maruyama', ...), got {solver.name!r}")
        grid = grid.sort(descending=True).values[:-1]
        steps = None if steps is None else steps - 1
    x, ts, monitor = _prepare(score_fn, sde, x, solver, steps, DEFAULT_INPAINT_STEPS, t_start, t_end, grid,
                              generator, device, dtype)
    if to_zero:
        ts = torch.cat([ts, ts.new_zeros(1)])
    known, mask = _known_and_mask(known, mask, x)
    process = ReverseProcess(sde, monitor, stochasticity if solver.kind == "sde" else 0.0)
    term = process.sde_term() if solver.kind == "sde" else process.ode_term()

    def replace(x, t):
        alpha, sigma = sde._alpha_sigma(t)
        noised = alpha * known + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return torch.where(mask, noised, x)

    x = replace(x, ts[0])
    n, nfe = len(ts) - 1, 0
    visited, states = [ts[:1]], [x[None]]
    blocks = range(0, n, j)
    bar = tqdm(total=len(blocks) * r, disable=not progress, desc=f"inpaint ({solver.name})", leave=False)
    for start in blocks:
        end = min(start + j, n)
        for rep in range(r):
            sol = _run(term, x, ts[start:end + 1], monitor, solver=solver, projection=replace, generator=generator,
                       noise_free_last_step=end == n, return_trajectory=return_trajectory)
            x, nfe = sol.x, nfe + sol.nfe
            if return_trajectory:
                visited.append(ts[start + 1:end + 1])
                states.append(sol.xs[1:])
            if rep < r - 1:
                x = _noise_forward(sde, x, ts[end], ts[start], generator)
                if return_trajectory:
                    visited.append(ts[start:start + 1])
                    states.append(x[None])
            bar.update()
    bar.close()
    x = torch.where(mask, known, x)
    if not return_trajectory:
        return Solution(x, ts, None, nfe)
    states[-1] = torch.cat([states[-1][:-1], x[None]])
    return Solution(x, torch.cat(visited), torch.cat(states), nfe)


def _noise_forward(sde, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, generator) -> torch.Tensor:
    """A draw of ``x_s ~ q(x_s | x_t)`` for ``s > t``: the exact forward transition of a linear SDE."""
    a_t, sig_t = sde._alpha_sigma(t)
    a_s, sig_s = sde._alpha_sigma(s)
    ratio = a_s / a_t
    std = (sig_s**2 - (ratio * sig_t) ** 2).clamp_min(0.0).sqrt()
    return ratio * x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
