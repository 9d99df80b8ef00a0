"""Time grids calibrated to a model: the grid that minimizes a solver's error at a fixed step count.

At 5–20 steps the error of a probability-flow ODE solver depends on where its steps fall more than
on anything else, and the best placement depends on the model (where its denoised prediction
turns). Like LD3 (Tong et al. 2024) and GITS (Chen et al. 2024), :func:`calibrate_grid` finds it
from the model alone: it draws a pilot batch from the prior, solves the ODE accurately once, and
moves the interior times of a ``steps``-step grid to minimize

    RMSE(grid) = sqrt(mean((x_grid(t_end) - x_ref(t_end))^2))  over the pilot batch,

the pathwise error ``benchmarks/solver_accuracy.py`` measures. No training data is needed. The
grid is parametrized by the log-SNR increments ``lambda_(i+1) - lambda_i = (lambda_end -
lambda_start) softmax(theta)_i`` (monotone for any ``theta``, end points fixed) and searched by
BFGS on finite-difference gradients (the solvers' coefficients are computed on the host in
float64 and carry no autograd graph). The search runs the solver ``steps`` times per gradient,
so it costs thousands of pilot-batch solves: it pays off when one model is sampled many times
with one solver and step count. Calibrate in float64 where the model allows: the gradients are
differences of errors, and on the test bed's ring float32 pilots ended 1.1-7x above float64's.
The calibrated grid is a tensor for ``sample_ode(..., grid=grid, solver=solver)``.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

from . import _checks
from .integrate import NonFiniteError, _Counted
from .sampling import DEFAULT_ODE_SOLVER, _solver_grid, sample_ode
from .sdes import SDE, check_sde
from .solvers.base import get_solver

DEFAULT_REFERENCE_SOLVER = "unipc_3"  # order 4 on the log-SNR grid
DEFAULT_REFERENCE_STEPS = 200
RUNS_PER_STEP = 150  # the default budget of solver runs, per step of the grid


class GridCalibration(NamedTuple):
    """Result of :func:`calibrate_grid`.

    ``grid``: the calibrated times ``(steps + 1,)``, float64, from ``t_start`` down to ``t_end``;
    ``rmse`` and ``initial_rmse``: the pilot batch's RMSE on it and on the initial grid;
    ``reference_error``: the reference's own RMSE, estimated from the same solve at half the
    steps (Richardson, with the reference solver's order; None for a given reference); ``runs``: the
    solver runs of the search (a grid rejected before solving counts, at no NFE); ``nfe``: all score
    calls, reference included.
    """

    grid: torch.Tensor
    rmse: float
    initial_rmse: float
    reference_error: float | None
    runs: int
    nfe: int


def calibrate_grid(score_fn, sde: SDE, x, steps: int, *, solver=DEFAULT_ODE_SOLVER, t_start: float | None = None,
                   t_end: float | None = None, init_grid=None, reference: torch.Tensor | None = None,
                   reference_solver=DEFAULT_REFERENCE_SOLVER, reference_steps: int = DEFAULT_REFERENCE_STEPS,
                   max_runs: int | None = None, generator=None, device=None,
                   dtype=None) -> GridCalibration:
    """The ``steps``-step grid on which ``solver`` best matches the exact probability-flow ODE from ``x``.

    ``x: (batch, *dims)``: the pilot batch, draws from the prior (or a shape: drawn with
    ``generator``, ``device``, ``dtype``). Its size decides how well the grid generalizes to new
    draws: a few draws that land between modes can pull a small batch's optimum (see
    docs/solvers.md). ``solver``: a fixed-step ODE solver (name or instance); ``init_grid``: the
    starting grid (a name of :func:`sdediff.time_grid` or a tensor; default the solver's
    ``default_grid``); ``t_start``, ``t_end`` as in :func:`sdediff.sample_ode`.

    ``reference``: the exact ``x(t_end)`` from ``x``; by default ``reference_solver`` (fixed-step)
    with ``reference_steps`` steps, whose error is estimated from half the steps; a warning says
    when it is not below a tenth of the calibrated RMSE (the search would then fit the
    reference's own error). The search stops after ``max_runs`` solver runs (default
    ``150 * steps``) or at a stationary point, and returns the best grid it ran (the initial one
    if nothing beat it by more than round-off). ``x`` must be float32 or float64 (float64 is
    better: see above); a solve on the initial grid that is not finite raises
    :class:`~sdediff.NonFiniteError`. Errors of ``score_fn`` propagate.
    """
    check_sde(sde)
    _checks.callable_("score_fn", score_fn)
    solver = _fixed_step("solver", solver)
    reference_solver = _fixed_step("reference_solver", reference_solver)
    steps = _checks.positive_int("steps", steps)
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (a 1-step grid has no interior time to place), got {steps}")
    max_runs = RUNS_PER_STEP * steps if max_runs is None else _checks.positive_int("max_runs", max_runs)
    reference_steps = _checks.positive_int("reference_steps", reference_steps)
    if reference_steps < 2:
        raise ValueError(f"reference_steps must be >= 2 (its error is estimated from half the steps), "
                         f"got {reference_steps}")
    if isinstance(x, (tuple, list, torch.Size)):
        x = sde.prior_sample(tuple(x), generator=generator, device=device, dtype=dtype)
    x = _checks.batched("x", x)
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64 (the search differences errors), got {x.dtype}")
    if reference is not None:
        reference = _checks.float_tensor("reference", reference)
        if reference.shape != x.shape:
            raise ValueError(f"reference must have x's shape {tuple(x.shape)}, got {tuple(reference.shape)}")
        if not bool(torch.isfinite(reference).all()):
            raise ValueError("reference must be finite")
        reference = reference.to(device=x.device, dtype=x.dtype)
    try:  # a grid tensor must have `steps` steps
        init = _solver_grid(sde, solver, steps, steps, t_start, t_end, init_grid)
    except ValueError as err:
        raise ValueError(f"init_grid: {err}") from None
    t_start, t_end = float(init[0]), float(init[-1])

    counted = _Counted(score_fn)  # every score call, those of runs that blow up included

    def solve(grid, slv, n=None):
        return sample_ode(counted, sde, x, steps=n, grid=grid, solver=slv, t_start=None if n is None else t_start,
                          t_end=None if n is None else t_end).x

    with torch.no_grad():
        reference_error = None
        if reference is None:
            reference = solve(None, reference_solver, reference_steps)
            # Richardson: an order-p solve at n steps is off by (its distance from the m-step solve) / ((n/m)^p - 1)
            half = reference_steps // 2
            ratio = (reference_steps / half) ** reference_solver.order - 1.0
            reference_error = _rmse(solve(None, reference_solver, half), reference) / ratio

        lam_start, lam_end = (float(v) for v in sde._log_snr(init[[0, -1]]))
        increments = sde._log_snr(init).diff() / (lam_end - lam_start)

        def grid_of(theta):
            logits = torch.cat([torch.as_tensor(theta, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
            lam = lam_start + (lam_end - lam_start) * torch.cat([torch.zeros(1, dtype=torch.float64),
                                                                  torch.softmax(logits, 0).cumsum(0)])
            ts = sde._t_from_log_snr(lam)
            ts[0], ts[-1] = t_start, t_end
            return ts

        def log_rmse(theta):
            ts = grid_of(theta)
            if not bool((ts.diff() < 0).all()):  # increments that underflowed to 0 in t
                return math.inf
            try:
                err = _rmse(solve(ts, solver), reference)
            except NonFiniteError:  # the solver blew up on this grid; errors of score_fn propagate
                return math.inf
            return math.log(err) if math.isfinite(err) and err > 0 else math.inf

        theta0 = (increments[:-1].log() - increments[-1].log()).tolist()
        # forward differences: sqrt(eps) = 3.5e-4 balances truncation and round-off in float32; in float64
        # 1e-6 did as well as its 1.5e-8
        step = max(1e-6, math.sqrt(torch.finfo(x.dtype).eps))
        theta, best, initial, runs = _search(log_rmse, theta0, max_runs, step)
    if not math.isfinite(initial):
        raise NonFiniteError(f"the solve on the initial grid is not finite (solver {solver.name!r}); "
                             "give another init_grid")
    initial, rmse = math.exp(initial), math.exp(best)
    if rmse >= initial * (1.0 - 1e-6):  # nothing better beyond round-off: keep the initial grid exactly
        grid, rmse = init, initial
    else:
        grid = grid_of(theta)
    if reference_error is not None and reference_error > 0.1 * rmse:
        warnings.warn(f"the reference solution's error (about {reference_error:.2g}) is not small against the "
                      f"calibrated RMSE {rmse:.2g}; raise reference_steps", RuntimeWarning, stacklevel=2)
    return GridCalibration(grid, rmse, initial, reference_error, runs, counted.count)


def _fixed_step(name: str, solver):
    solver = get_solver(solver, "ode")
    if solver.adaptive or not solver.evals_per_step:
        raise ValueError(f"{name} must be a fixed-step ODE solver (a fixed number of score calls per step), "
                         f"got {solver.name!r}")
    return solver


def _rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((x - ref) ** 2).mean().sqrt())


class _Budget(Exception):
    pass


def _search(f, x0: list[float], max_runs: int, step: float):
    """Minimize ``f`` from ``x0`` by BFGS on forward-difference gradients (``step`` apart).

    ``(x, f(x), f(x0), runs)``, ``x`` the best point evaluated, returned also when ``max_runs``
    evaluations cut the search short. An infinite value (a failed run) is passed on as 10 above
    the worst finite one: finite, so BFGS's line search backs off, and not so large that a
    difference across it swamps the gradient.
    On the benchmark problems (10 steps) BFGS reached what Nelder–Mead followed by Powell reached
    (ring2d 1.1e-3, mix64d 1.8e-3) in 0.6x and 0.4x the runs, where Nelder–Mead alone stalled
    (2.8e-3 on ring2d): the error's valleys are narrow and curved.
    """
    from scipy.optimize import minimize

    best = [list(x0), math.inf]
    first, worst = None, None
    runs = 0

    def counted(x):
        nonlocal runs, first, worst
        if runs >= max_runs:
            raise _Budget
        runs += 1
        value = f(x.tolist())
        first = value if first is None else first
        if value < best[1]:
            best[0], best[1] = x.tolist(), value
        if math.isfinite(value):
            worst = value if worst is None else max(worst, value)
            return value
        return (0.0 if worst is None else worst) + 10.0

    try:
        minimize(counted, x0, method="BFGS", options=dict(eps=step, maxiter=10**6))
    except _Budget:
        pass
    return best[0], best[1], first, runs
