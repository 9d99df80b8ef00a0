"""Public sampling loops: the probability-flow ODE and the reverse-time SDE, from ``t_start`` down to ``t_end``."""

from __future__ import annotations

import torch

from . import _checks
from .grids import time_grid
from ._tensors import checksum, in_state_dtype, time_dtype
from .integrate import NonFiniteError, Solution, integrate
from .reverse import ReverseProcess
from .sdes import SDE, check_sde
from .solvers.base import get_solver

DEFAULT_ODE_SOLVER = "unipc"
DEFAULT_ODE_STEPS = 50
DEFAULT_SDE_STEPS = 1000
DEFAULT_T_END = 1e-3


class _ScoreMonitor:
    """The checksum of every score, kept on the device and read only if the integration fails (no host sync).

    A failure then tells whether a score was non-finite by the end of the step in which the state
    first was (the score is to blame) or only later (the state overflowed and fed it infinities).
    Stages inside a step are not checked, so with several calls per step a stage's overflow in
    the failing step still counts against the score.
    The checksums are detached, and stacked every ``chunk`` calls, so the thousands of calls of an
    adaptive solver keep a few tensors and no graph; scores of mixed precision stack in the wider dtype.
    """

    chunk = 256

    def __init__(self, score_fn):
        self.score_fn, self._stacked, self._recent = score_fn, [], []

    def __call__(self, x, t):
        # checked as ReverseProcess.score returns it: a float32 score that overflows a float16 state failed
        score = in_state_dtype(self.score_fn(x, t), x)
        if isinstance(score, torch.Tensor):  # anything else is refused by the caller, which stops the run
            self._recent.append(checksum(score))
            if len(self._recent) == self.chunk:
                self._stacked.append(torch.stack(self._recent))
                self._recent = []
        return score

    @property
    def calls(self) -> int:
        """The score calls recorded so far."""
        return self.chunk * len(self._stacked) + len(self._recent)

    def sums(self) -> torch.Tensor:
        """The checksums of all calls so far, ``(calls,)``."""
        parts = self._stacked + ([torch.stack(self._recent)] if self._recent else [])
        return torch.cat(parts) if parts else torch.empty(0)

    def first_nonfinite(self, since: int = 0) -> int | None:
        """The index, counted from call ``since``, of the first non-finite score; None if all were finite (a host sync)."""
        return first_nonfinite(self.sums()[since:])


def first_nonfinite(sums: torch.Tensor) -> int | None:
    """The index of the first non-finite entry of the 1-D ``sums``; None if all are finite (a host sync)."""
    bad = (~torch.isfinite(sums)).nonzero()
    return int(bad[0]) if len(bad) else None


def blame_score(err: NonFiniteError, first_bad_score: int | None) -> NonFiniteError:
    """``err``, naming the score if its first non-finite call (index ``first_bad_score``) came by the
    end of the state's failing step (``err.calls`` calls; unknown steps, ``calls=None``, blame any)."""
    if first_bad_score is not None and (err.calls is None or first_bad_score < err.calls):
        return NonFiniteError(f"{err}: score_fn returned non-finite values", calls=err.calls)
    return err


def _start(score_fn, sde, x, generator, device, dtype):
    """Validate the common inputs; draw ``x`` from the prior when it is a shape."""
    check_sde(sde)
    _checks.callable_("score_fn", score_fn)
    if isinstance(x, (tuple, list, torch.Size)):
        x = sde.prior_sample(tuple(x), generator=generator, device=device, dtype=dtype)
    return _checks.batched("x", x), _ScoreMonitor(score_fn)


def _solver_grid(sde, solver, steps, default_steps, t_start, t_end, grid, dtype=torch.float64, device=None):
    """The time grid of a sampler: ``grid=None`` takes the solver's ``default_grid``; a grid tensor
    sets ``t_start`` and ``t_end`` itself; otherwise ``steps`` and ``t_end`` get their defaults."""
    if grid is None:
        grid = solver.default_grid if solver is not None else "uniform"
    if isinstance(grid, torch.Tensor):
        if t_start is not None or t_end is not None:
            raise ValueError("t_start and t_end are set by the grid tensor; do not pass them with it")
    else:
        steps = default_steps if steps is None else steps
        t_end = DEFAULT_T_END if t_end is None else t_end
    return time_grid(sde, steps, grid=grid, t_start=t_start, t_end=t_end, dtype=dtype, device=device)


def _prepare(score_fn, sde, x, solver, steps, default_steps, t_start, t_end, grid, generator, device, dtype):
    """``_start``, then the time grid (:func:`_solver_grid`) on ``x``'s device, in its :func:`time_dtype`."""
    x, monitor = _start(score_fn, sde, x, generator, device, dtype)
    ts = _solver_grid(sde, solver, steps, default_steps, t_start, t_end, grid, time_dtype(x.dtype), x.device)
    return x, ts, monitor


def _run(term, x, ts, monitor: _ScoreMonitor, **kwargs) -> Solution:
    start = monitor.calls  # a monitor may serve several runs (inpainting's resampling)
    try:
        return integrate(term, x, ts, **kwargs)
    except NonFiniteError as err:
        blamed = blame_score(err, monitor.first_nonfinite(start))
        if blamed is err:
            raise
        raise blamed from None


def sample_ode(score_fn, sde: SDE, x, *, steps: int | None = None, solver=DEFAULT_ODE_SOLVER,
               t_start: float | None = None, t_end: float | None = None, grid=None, rtol: float = 1e-5,
               atol: float = 1e-5, return_trajectory: bool = False, progress: bool = False, generator=None,
               device=None, dtype=None) -> Solution:
    """Integrate the probability-flow ODE ``dx/dt = f(x, t) - 1/2 g(t)^2 score_fn(x, t)``.

    ``x: (batch, *dims)`` is a draw from the marginal at ``t_start`` (default ``sde.T``, where it is
    the prior), or a shape, in which case it is drawn from ``sde.prior_sample`` with ``generator``,
    ``device`` and ``dtype``. Integrates down to ``t_end`` (default 1e-3) in ``steps`` steps
    (default 50) of the grid ``grid`` (see :func:`sdediff.time_grid`; default: the solver's
    ``default_grid``) with ``solver`` (a name from ``available_solvers("ode")`` or an instance;
    default ``"unipc"`` on the log-SNR grid, one score call per step, chosen by
    ``benchmarks/solver_accuracy.py``). Adaptive solvers (``"dopri5"``, ...) use ``rtol``/``atol``
    and visit the grid only when ``return_trajectory`` is set.

    Returns a :class:`Solution`: ``.x`` the samples, ``.nfe`` the number of score evaluations,
    ``.ts`` the grid and ``.xs`` the trajectory ``(len(ts), batch, *dims)`` if asked for.
    """
    solver = get_solver(solver, "ode")
    x, ts, monitor = _prepare(score_fn, sde, x, solver, steps, DEFAULT_ODE_STEPS, t_start, t_end, grid, generator,
                              device, dtype)
    if solver.adaptive and not return_trajectory:
        ts = ts[[0, -1]]
    term = ReverseProcess(sde, monitor, 0.0).ode_term()
    return _run(term, x, ts, monitor, solver=solver, rtol=rtol, atol=atol, return_trajectory=return_trajectory,
                progress=progress)


def sample_sde(score_fn, sde: SDE, x, *, steps: int | None = None, solver="euler_maruyama",
               stochasticity: float = 1.0, t_start: float | None = None, t_end: float | None = None,
               grid=None, generator=None, brownian=None, noise_free_last_step: bool = True,
               return_trajectory: bool = False, progress: bool = False, device=None, dtype=None) -> Solution:
    """Integrate the reverse-time SDE ``dx = [f - (1+s^2)/2 g^2 score] dt + s g dW̄`` (s = ``stochasticity``).

    ``s = 1`` is Anderson's reverse SDE, ``0 < s < 1`` keeps the same marginals with less noise.
    Arguments as in :func:`sample_ode`, with ``steps`` defaulting to 1000 and ``solver`` a name
    from ``available_solvers("sde")``. Noise is drawn from ``generator`` (on the device of ``x``),
    or replayed from ``brownian``: a callable ``(t0, t1) -> dW`` (variance ``|t1 - t0|``) or a
    torchsde Brownian motion over the elapsed time ``t_start - t`` (see :func:`integrate`). With
    ``noise_free_last_step`` (default, as score_sde) the final step adds no noise: it returns the
    mean of the last update.
    """
    solver = get_solver(solver, "sde")
    x, ts, monitor = _prepare(score_fn, sde, x, solver, steps, DEFAULT_SDE_STEPS, t_start, t_end, grid, generator,
                              device, dtype)
    term = ReverseProcess(sde, monitor, stochasticity).sde_term()
    return _run(term, x, ts, monitor, solver=solver, brownian=brownian, generator=generator,
                noise_free_last_step=noise_free_last_step, return_trajectory=return_trajectory, progress=progress)
