"""The one integration loop: steps a solver along a time grid and owns the Brownian increments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import _checks
from ._tensors import checksum, checksum_dtype, finiteness, time_dtype
from .solvers.base import ODESolver, SDESolver, get_solver
from .solvers.external import TorchdiffeqSolver, TorchsdeSolver, elapsed_time
from .solvers.langevin import Corrector
from .terms import ODETerm, SDETerm


class NonFiniteError(FloatingPointError):
    """A NaN or infinity appeared during integration; the message names the step and the time.

    ``calls``: the score (or field) calls made up to the end of that step, where the loop knows
    them per step (None otherwise), so a caller can tell which calls came before the state failed.
    """

    def __init__(self, message: str, *, calls: int | None = None):
        super().__init__(message)
        self.calls = calls


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


def _raise_nonfinite(step: int, ts: torch.Tensor, corrector_only: bool = False, calls: int | None = None):
    if corrector_only:
        raise NonFiniteError(f"non-finite values in the state after the corrector steps at t = {ts[step].item():.6g}",
                             calls=calls)
    t0, t1 = ts[step].item(), ts[step + 1].item()
    raise NonFiniteError(f"non-finite values in the state after step {step} (t = {t0:.6g} -> {t1:.6g})", calls=calls)


def _counted_term(term):
    """``(term, counter)``: the term with its score (when it carries a process) or its field counted."""
    if isinstance(term, (ODETerm, SDETerm)) and term.process is not None:
        counter = _Counted(term.process.score_fn)
        process = term.process.with_score_fn(counter)
        return (process.ode_term() if isinstance(term, ODETerm) else process.sde_term()), counter
    if isinstance(term, ODETerm):
        counter = _Counted(term.vector_field)
        return ODETerm(counter), counter
    if isinstance(term, SDETerm):
        counter = _Counted(term.drift)
        return SDETerm(counter, term.diffusion, term.additive, term.diffusion_dx), counter
    raise TypeError(f"term must be an ODETerm or SDETerm, got {type(term).__name__}")


def integrate(term, x: torch.Tensor, ts: torch.Tensor, *, solver, corrector=None, projection=None, brownian=None,
              generator=None, noise_free_last_step: bool = False, rtol: float = 1e-5, atol: float = 1e-5,
              return_trajectory: bool = False, progress: bool = False) -> Solution:
    """Integrate an :class:`ODETerm` or :class:`SDETerm` from ``ts[0]`` through the grid ``ts``.

    ``x: (batch, *dims)`` is the state at ``ts[0]``; ``ts: (n + 1,)`` is strictly monotone.
    ``solver``: a registered name or a solver instance of the term's kind.

    For SDEs the noise is drawn from ``generator``, or replayed from ``brownian``: a callable
    ``(t0, t1) -> dW`` (variance ``|t1 - t0|``, shape of ``x``; not for torchsde solvers, which
    need Lévy areas), or a torchsde Brownian motion of shape ``(batch, prod(dims))`` over the
    elapsed time ``|t - ts[0]|``, which every SDE solver reads alike (the same path across
    solvers). ``noise_free_last_step`` drops the noise of the final step.

    ``corrector`` (a :class:`~sdediff.solvers.Corrector`, for terms that carry a reverse process)
    runs its Langevin steps at ``ts[i]`` before each step (predictor–corrector, in score_sde's
    order), drawing its noise from ``generator``. With ``solver=None`` nothing is stepped: the
    corrector runs at every time of ``ts`` (annealed Langevin dynamics).

    ``projection(x, t) -> x`` is applied to the state after every step, at the step's end time
    (inpainting's replacement of the known region, :func:`sdediff.sample_inpaint`). A multistep
    solver keeps the history of its unprojected evaluations.

    ``rtol``/``atol`` apply to adaptive solvers; ``progress`` shows a bar for fixed-step ones.
    ``nfe`` counts score calls for terms with a process and field calls otherwise. Non-finite
    states raise :class:`NonFiniteError` naming the step and time, checked once at the end (no
    per-step host sync).
    """
    x = _checks.batched("x", x)
    ts = check_grid(ts).to(device=x.device, dtype=time_dtype(x.dtype))
    term, counter = _counted_term(term)
    if solver is None and corrector is None:
        raise ValueError("give a solver, a corrector, or both")
    if solver is not None:
        solver = get_solver(solver, "ode" if isinstance(term, ODETerm) else "sde")
        solver.check_term(term)
    if corrector is not None:
        if not isinstance(corrector, Corrector):
            raise TypeError(f"corrector must be a sdediff Corrector, got {type(corrector).__name__}")
        if term.process is None:
            raise TypeError("a corrector needs the score: give a term built by ReverseProcess.ode_term() / .sde_term()")
    if projection is not None:
        _checks.callable_("projection", projection)

    if isinstance(solver, (TorchdiffeqSolver, TorchsdeSolver)):
        if corrector is not None or projection is not None:
            raise ValueError(f"solver {solver.name!r} runs its own loop and cannot be combined with a corrector "
                             "or a projection")
        field = term.vector_field if isinstance(term, ODETerm) else term.drift
        xs = _solve_external(solver, term, field, x, ts, brownian, generator, noise_free_last_step, rtol, atol)
        finite = torch.isfinite(xs.reshape(len(ts), -1)).all(1)
        if not bool(finite.all()):
            _raise_nonfinite(int((~finite).nonzero()[0]) - 1, ts)
        return Solution(xs[-1], ts, xs if return_trajectory else None, counter.count)

    steps = len(ts) - 1
    if isinstance(solver, SDESolver):
        brownian = _increments(brownian, x, ts, generator)
    iterations = steps + (solver is None)
    # One sum per step, written in place (no per-step allocation): finite iff the state is.
    checksums = torch.empty(iterations, dtype=checksum_dtype(x.dtype), device=x.device)
    calls = []  # score calls made by the end of each step: host integers, for the failure's report
    xs = [x] if return_trajectory and solver is not None else ([] if return_trajectory else None)
    name = solver.name if solver is not None else type(corrector).__name__
    multistep = solver is not None and solver.multistep
    state = solver.init(term, x, ts) if multistep else None
    times = ts.unbind()
    for i in tqdm(range(iterations), desc=name, leave=False) if progress else range(iterations):
        t0 = times[i]
        if corrector is not None:
            for _ in range(corrector.n_steps):
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = corrector.step(term.process, x, t0, z)
        if solver is not None:
            noisy = isinstance(solver, SDESolver) and not (noise_free_last_step and i == steps - 1)
            dw = brownian(t0, times[i + 1]) if noisy else None
            x, state = advance(solver, term, x, t0, times[i + 1], state, dw)
        if projection is not None:
            x = projection(x, times[i + 1] if solver is not None else t0)
        if checksum_dtype(x.dtype) == checksums.dtype:
            checksum(x, out=checksums[i])
        else:  # the state changed precision (a score of another dtype): record its finiteness alone
            checksums[i] = finiteness(checksum(x))
        if xs is not None:
            xs.append(x)
        calls.append(counter.count)
    finite = torch.isfinite(checksums)
    if not bool(finite.all()):  # the one host sync of the loop
        step = int((~finite).nonzero()[0])
        _raise_nonfinite(step, ts, corrector_only=solver is None, calls=calls[step])
    return Solution(x, ts, torch.stack(xs) if xs is not None else None, counter.count)


def advance(solver, term, x, t0, t1, state=None, dw=None):
    """One step of a fixed-step ``solver`` from ``t0`` to ``t1``: ``(x1, state)``.

    ``dw``: the Brownian increment of an SDE solver (None: the noise-free step); ``state``: a
    multistep solver's (passed through unchanged for the others).
    """
    if isinstance(solver, ODESolver):
        return solver.step(term, x, t0, t1, state) if solver.multistep else (solver.step(term, x, t0, t1), state)
    return solver.step(term, x, t0, t1, dw, state) if solver.multistep else (solver.step(term, x, t0, t1, dw), state)


def _increments(brownian, x, ts, generator):
    if brownian is None:
        return gaussian_increments(x, generator)
    if _is_torchsde_brownian(brownian):
        return _elapsed_time_increments(brownian, x, ts[0])
    if not callable(brownian):
        raise TypeError("brownian must be callable (t0, t1) -> dW or a torchsde Brownian motion, "
                        f"got {type(brownian).__name__}")
    return brownian


def _solve_external(solver, term, field, x, ts, brownian, generator, noise_free_last_step, rtol, atol):
    if isinstance(solver, TorchdiffeqSolver):
        _checks.real("rtol", rtol, low=0.0, low_open=True)
        _checks.real("atol", atol, low=0.0, low_open=True)
        try:
            return solver.solve(field, x, ts, rtol=rtol, atol=atol)
        except AssertionError as err:  # torchdiffeq's way of giving up on a tolerance it cannot meet
            if "underflow in dt" not in str(err):
                raise
            raise ValueError(f"the adaptive solver {solver.name!r} could not meet rtol={rtol}, atol={atol} on a "
                             f"{x.dtype} state: its step size underflowed; raise rtol or atol, or integrate in a "
                             "wider dtype") from None
    last = len(ts) - 2 if noise_free_last_step else len(ts) - 1
    xs = solver.solve(term, x, ts[: last + 1], bm=brownian, generator=generator) if last > 0 else x[None]
    if noise_free_last_step:
        x_last = xs[-1] + (ts[-1] - ts[-2]) * term.drift(xs[-1], ts[-2])
        xs = torch.cat([xs, x_last[None]])
    return xs
