"""The one integration loop: steps a solver along a time grid and owns the Brownian increments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import _checks
from ._tensors import nonfinite
from .solvers.base import ODESolver, SDESolver, get_solver
from .solvers.external import TorchdiffeqSolver, TorchsdeSolver, elapsed_time
from .terms import ODETerm, SDETerm


class NonFiniteError(FloatingPointError):
    """A NaN or infinity appeared during integration; the message names the step and the time."""


@dataclass
class Solution:
    """Result of an integration.

    ``x``: final state ``(batch, *dims)``; ``ts``: the grid ``(n + 1,)``; ``xs``: the states at
    ``ts``, ``(n + 1, batch, *dims)``, when a trajectory was asked for (else None); ``nfe``: number
    of drift (score) evaluations.
    """

    x: torch.Tensor
    ts: torch.Tensor
    xs: Optional[torch.Tensor]
    nfe: int


class _Counted:
    """Wraps a field ``(x, t) -> tensor`` and counts its calls (on the host: no sync)."""

    def __init__(self, fn):
        self.fn, self.count = fn, 0

    def __call__(self, x, t):
        self.count += 1
        return self.fn(x, t)


def check_grid(ts) -> torch.Tensor:
    """A 1-D float tensor of at least two finite, strictly monotone times."""
    ts = _checks.float_tensor("ts", ts)
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError(f"the time grid must be 1-D with at least 2 times, got shape {tuple(ts.shape)}")
    diffs = ts[1:] - ts[:-1]
    if not bool(torch.isfinite(ts).all()) or not (bool((diffs > 0).all()) or bool((diffs < 0).all())):
        raise ValueError("the time grid must be finite and strictly monotone")
    return ts


def gaussian_increments(x: torch.Tensor, generator: torch.Generator | None = None):
    """Brownian increments ``dW ~ N(0, |t1 - t0| I)`` of ``x``'s shape, drawn from ``generator``."""

    def brownian(t0, t1):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return z * (t1 - t0).abs().sqrt()

    return brownian


def _is_torchsde_brownian(brownian) -> bool:
    import torchsde

    return isinstance(brownian, torchsde.BaseBrownian)


def _elapsed_time_increments(bm, x: torch.Tensor, t_first: torch.Tensor):
    """Read a torchsde Brownian motion over the elapsed time ``|t - t_first|``, as torchsde solvers do here."""

    def brownian(t0, t1):
        return bm(elapsed_time(t0, t_first), elapsed_time(t1, t_first)).reshape(x.shape)

    return brownian


def _raise_nonfinite(step: int, ts: torch.Tensor):
    t0, t1 = ts[step].item(), ts[step + 1].item()
    raise NonFiniteError(f"non-finite values in the state after step {step} (t = {t0:.6g} -> {t1:.6g})")


def integrate(term, x: torch.Tensor, ts: torch.Tensor, *, solver, brownian=None, generator=None,
              noise_free_last_step: bool = False, rtol: float = 1e-5, atol: float = 1e-5,
              return_trajectory: bool = False, progress: bool = False) -> Solution:
    """Integrate an :class:`ODETerm` or :class:`SDETerm` from ``ts[0]`` through the grid ``ts``.

    ``x: (batch, *dims)`` is the state at ``ts[0]``; ``ts: (n + 1,)`` is strictly monotone.
    ``solver``: a registered name or a solver instance of the term's kind.

    For SDEs the noise is drawn from ``generator``, or replayed from ``brownian``: a callable
    ``(t0, t1) -> dW`` (variance ``|t1 - t0|``, shape of ``x``; not for torchsde solvers, which
    need Lévy areas), or a torchsde Brownian motion of shape ``(batch, prod(dims))`` over the
    elapsed time ``|t - ts[0]|``, which every SDE solver reads alike (the same path across
    solvers). ``noise_free_last_step`` drops the noise of the final step.

    ``rtol``/``atol`` apply to adaptive solvers; ``progress`` shows a bar for fixed-step ones.
    Non-finite states raise :class:`NonFiniteError` naming the step and time, checked once at the
    end (no per-step host sync).
    """
    x = _checks.batched("x", x)
    ts = check_grid(ts).to(device=x.device, dtype=x.dtype)
    if isinstance(term, ODETerm):
        solver = get_solver(solver, "ode")
        field = _Counted(term.vector_field)
    elif isinstance(term, SDETerm):
        solver = get_solver(solver, "sde")
        field = _Counted(term.drift)
        term = SDETerm(field, term.diffusion, term.additive, term.diffusion_dx)
    else:
        raise TypeError(f"term must be an ODETerm or SDETerm, got {type(term).__name__}")

    if isinstance(solver, (TorchdiffeqSolver, TorchsdeSolver)):
        xs = _solve_external(solver, term, field, x, ts, brownian, generator, noise_free_last_step, rtol, atol)
        finite = torch.isfinite(xs.reshape(len(ts), -1)).all(1)
        if not bool(finite.all()):
            _raise_nonfinite(int((~finite).nonzero()[0]) - 1, ts)
        return Solution(xs[-1], ts, xs if return_trajectory else None, field.count)

    steps = len(ts) - 1
    if isinstance(solver, SDESolver):
        if brownian is None:
            brownian = gaussian_increments(x, generator)
        elif _is_torchsde_brownian(brownian):
            brownian = _elapsed_time_increments(brownian, x, ts[0])
        elif not callable(brownian):
            raise TypeError("brownian must be callable (t0, t1) -> dW or a torchsde Brownian motion, "
                            f"got {type(brownian).__name__}")
    first_bad = torch.full((), -1, dtype=torch.long, device=x.device)
    xs = [x] if return_trajectory else None
    for i in tqdm(range(steps), disable=not progress, desc=solver.name, leave=False):
        t0, t1 = ts[i], ts[i + 1]
        if isinstance(solver, ODESolver):
            x = solver.step(field, x, t0, t1)
        else:
            dw = None if (noise_free_last_step and i == steps - 1) else brownian(t0, t1)
            x = solver.step(term, x, t0, t1, dw)
        first_bad = torch.where((first_bad < 0) & nonfinite(x), i, first_bad)
        if xs is not None:
            xs.append(x)
    bad = int(first_bad)  # the one host sync of the loop
    if bad >= 0:
        _raise_nonfinite(bad, ts)
    return Solution(x, ts, torch.stack(xs) if xs is not None else None, field.count)


def _solve_external(solver, term, field, x, ts, brownian, generator, noise_free_last_step, rtol, atol):
    if isinstance(solver, TorchdiffeqSolver):
        _checks.real("rtol", rtol, low=0.0, low_open=True)
        _checks.real("atol", atol, low=0.0, low_open=True)
        return solver.solve(field, x, ts, rtol=rtol, atol=atol)
    last = len(ts) - 2 if noise_free_last_step else len(ts) - 1
    xs = solver.solve(term, x, ts[: last + 1], bm=brownian, generator=generator) if last > 0 else x[None]
    if noise_free_last_step:
        x_last = xs[-1] + (ts[-1] - ts[-2]) * term.drift(xs[-1], ts[-2])
        xs = torch.cat([xs, x_last[None]])
    return xs
