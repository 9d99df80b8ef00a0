"""Fixed-shape, fixed-grid sampling captured as one program (``torch.compile``).

The eager loop pays, per step, Python and one kernel launch per tensor operation. For a small
network, and on a GPU above all, that is a visible share of a sample. :class:`CompiledODESampler`
and :class:`CompiledSDESampler` fix the solver, the grid and the solver's coefficients once, trace
the whole loop (the score network included) into one graph, and compile it per input shape, dtype
and device: on CUDA with ``mode="reduce-overhead"`` (CUDA graphs: the whole loop is one replay),
elsewhere with Inductor's fused kernels. The first call for a shape compiles (seconds to minutes); later calls reuse it.
The steps are the eager solvers' own ``step`` functions, so results match :func:`sample_ode`
and :func:`sample_sde` (given the same noise) to round-off. The loop is unrolled, so the compile
time grows with the number of steps: this suits the 5–50 step regime.
"""

from __future__ import annotations

import types

import torch

from . import _checks
from ._tensors import checksum, time_dtype
from .integrate import NonFiniteError, Solution, _raise_nonfinite, advance
from .reverse import ReverseProcess
from .sampling import DEFAULT_ODE_SOLVER, _ScoreMonitor, _solver_grid, blame_score, first_nonfinite
from .sdes import SDE, check_sde
from .solvers.base import get_solver
from .solvers.external import TorchdiffeqSolver, TorchsdeSolver

DEFAULT_STEPS = 50  # for both (not sample_sde's 1000): the traced loop is unrolled
MODES = ("auto", None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _own_code(fn):
    """``fn`` with a code object of its own.

    Dynamo keeps compiled variants, and its recompile limit, per code object; without a copy every
    sampler (each with its own grid and coefficients) would count against the one closure's limit.
    """
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class _CompiledSampler:
    """Validation, the grid, one compiled program per (device, dtype, shape, mode) and the checked call.

    Subclasses build the term (probability-flow ODE or reverse SDE) and give ``_increment``.
    """

    kind = ""

    def __init__(self, term, sde: SDE, *, steps, solver, grid, t_start, t_end, mode, backend, fullgraph):
        solver = get_solver(solver, self.kind)
        if solver.adaptive or solver.evals_per_step < 1 or isinstance(solver, (TorchdiffeqSolver, TorchsdeSolver)):
            raise ValueError(f"solver {solver.name!r} runs its own loop or has no fixed number of score calls per "
                             f"step; a compiled sampler needs a fixed-step sdediff solver (see "
                             f"available_solvers({self.kind!r}))")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a torch.compile backend name, got {type(backend).__name__}")
        self.sde, self.solver, self.term = sde, solver, term
        self.mode, self.backend, self.fullgraph = mode, backend, bool(fullgraph)
        solver.check_term(term)
        self.ts = _solver_grid(sde, solver, steps, DEFAULT_STEPS, t_start, t_end, grid)  # float64, validated
        self.steps = len(self.ts) - 1
        self._programs: dict = {}  # (device, dtype, shape, mode) -> (grid, compiled loop)

    def _increment(self, i, t0, t1, noise):
        """Step ``i``'s Brownian increment (None for ODEs and noise-free steps)."""
        return None

    def _loop(self, x, noise, ts, state):
        """``(x at the last time, the state's checksum after each step, each score call's checksum)``."""
        times = ts.unbind()
        sums = []
        monitor = _ScoreMonitor(self.term.process.score_fn)  # sample_ode's, traced with the loop
        process = self.term.process.with_score_fn(monitor)
        term = process.ode_term() if self.kind == "ode" else process.sde_term()
        for i in range(len(times) - 1):
            x, state = advance(self.solver, term, x, times[i], times[i + 1], state,
                               self._increment(i, times[i], times[i + 1], noise))
            sums.append(checksum(x))
        return x, torch.stack(sums), monitor.sums()

    def _program(self, x: torch.Tensor):
        mode = self.mode
        if mode == "auto":
            mode = "reduce-overhead" if x.device.type == "cuda" else None
        if mode == "default" or self.backend != "inductor":  # modes are Inductor's; other backends ignore them
            mode = None
        # Each shape gets its own program (and code object), so ragged batches never run into
        # dynamo's limit of 8 variants per code object.
        key = (x.device, x.dtype, tuple(x.shape), mode)
        if key not in self._programs:
            ts = self.ts.to(device=x.device, dtype=time_dtype(x.dtype))
            # The coefficients are computed here, eagerly (a multistep solver's are host floats);
            # the traced loop sees them as constants.
            state = self.solver.init(self.term, x, ts) if self.solver.multistep else None
            # One eager score call first: a score that fills a cache on its first call (the test
            # bed's per-device parameters, a lazily built buffer) would otherwise be traced in its
            # cache-missing branch, and the second call would compile the loop again.
            self.term.process.score(x, ts[0])
            loop = torch.compile(_own_code(lambda x, noise: self._loop(x, noise, ts, state)), mode=mode,
                                 backend=self.backend, fullgraph=self.fullgraph, dynamic=False)
            self._programs[key] = (ts, loop)
        return self._programs[key]

    def _run(self, x: torch.Tensor, noise) -> Solution:
        # Inference only: under autograd the compiled program would keep every step's activations
        # (in the CUDA graph's pool, too), and a change of grad mode would compile it again.
        with torch.no_grad():
            ts, loop = self._program(x)
            out, sums, score_sums = (v.clone() for v in loop(x, noise))
        step = first_nonfinite(sums)  # the one host sync
        if step is not None:
            try:
                _raise_nonfinite(step, ts, calls=(step + 1) * self.solver.evals_per_step)
            except NonFiniteError as err:
                raise blame_score(err, first_nonfinite(score_sums)) from None
        # A call counter inside the traced loop would be guarded on and force a recompile per call;
        # the count is fixed by the solver instead (tests check it against the eager loops' counts).
        return Solution(out, ts.clone(), None, self.steps * self.solver.evals_per_step)  # the loop reads ts


_COMMON = """``score_fn(x, t)`` with ``x: (batch, *dims)``, ``t: (batch,)``; it is traced with the loop,
    so it must be capturable by ``torch.compile`` (with ``fullgraph``, in one graph: no ``.item()``,
    no data-dependent Python branches). ``steps``, ``solver``, ``grid``, ``t_start``, ``t_end`` as in
    the eager function; adaptive and torchdiffeq/torchsde solvers are refused. ``mode`` is
    ``torch.compile``'s; ``"auto"`` takes ``"reduce-overhead"`` (CUDA graphs) for CUDA inputs and
    the default elsewhere. ``backend="eager"`` only traces (a quick check that the loop captures).
    Sampling runs under ``torch.no_grad()`` (inference only). Each input shape, dtype and device
    compiles once; an eager score call before the first trace lets a score fill its lazy caches.
    The returned ``x`` is a fresh tensor (CUDA graph outputs are copied out of the graph's memory
    pool, which the next replay overwrites). Non-finite states raise
    :class:`~sdediff.NonFiniteError` naming the step, and the score when it failed first, as in
    the eager loop."""


class CompiledODESampler(_CompiledSampler):
    __doc__ = """``sampler(x_T) -> Solution``: :func:`sample_ode` on a fixed grid with a fixed-step solver, compiled.

    """ + _COMMON

    kind = "ode"

    def __init__(self, score_fn, sde: SDE, *, steps: int | None = None, solver=DEFAULT_ODE_SOLVER,
                 grid=None, t_start: float | None = None, t_end: float | None = None, mode="auto",
                 backend: str = "inductor", fullgraph: bool = True):
        check_sde(sde)
        term = ReverseProcess(sde, _checks.callable_("score_fn", score_fn), 0.0).ode_term()
        super().__init__(term, sde, steps=steps, solver=solver, grid=grid, t_start=t_start, t_end=t_end,
                         mode=mode, backend=backend, fullgraph=fullgraph)

    def __call__(self, x: torch.Tensor) -> Solution:
        """Integrate from ``x: (batch, *dims)`` at the grid's first time to its last."""
        return self._run(_checks.batched("x", x), None)


class CompiledSDESampler(_CompiledSampler):
    __doc__ = """``sampler(x_T, generator=) -> Solution``: :func:`sample_sde` on a fixed grid, compiled.

    ``stochasticity`` and ``noise_free_last_step`` as in :func:`sample_sde` (default solver
    ``"euler_maruyama"``, 50 steps here: the loop is unrolled). The standard normal draws of all
    steps, ``(steps, batch, *dims)``, are made before the compiled loop runs, from ``generator``,
    or passed as ``noise=``; step ``i`` uses ``dW = noise[i] sqrt(|t_(i+1) - t_i|)`` (with
    ``noise_free_last_step``, ``noise[-1]`` is unused). :func:`sample_sde` with ``brownian``
    replaying the same draws gives the same samples; with the same ``generator`` it does not
    (it draws step by step, and a generator's stream depends on the sizes drawn).
    """ + _COMMON

    kind = "sde"

    def __init__(self, score_fn, sde: SDE, *, steps: int | None = None, solver="euler_maruyama",
                 stochasticity: float = 1.0, grid=None, t_start: float | None = None, t_end: float | None = None,
                 noise_free_last_step: bool = True, mode="auto", backend: str = "inductor", fullgraph: bool = True):
        check_sde(sde)
        term = ReverseProcess(sde, _checks.callable_("score_fn", score_fn), stochasticity).sde_term()
        self.noise_free_last_step = bool(noise_free_last_step)
        super().__init__(term, sde, steps=steps, solver=solver, grid=grid, t_start=t_start, t_end=t_end,
                         mode=mode, backend=backend, fullgraph=fullgraph)

    def _increment(self, i, t0, t1, noise):
        if self.noise_free_last_step and i == self.steps - 1:
            return None
        return noise[i] * (t1 - t0).abs().sqrt()

    def __call__(self, x: torch.Tensor, *, generator=None, noise=None) -> Solution:
        """Integrate from ``x: (batch, *dims)``; ``noise``: optional standard normals ``(steps, batch, *dims)``."""
        x = _checks.batched("x", x)
        shape = (self.steps,) + tuple(x.shape)
        if noise is not None and generator is not None:
            raise ValueError("give noise or a generator to draw it from, not both")
        if noise is None:
            noise = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
        elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape:
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must be a tensor of shape (steps, batch, *dims) = {shape}, got {got}")
        return self._run(x, noise.to(dtype=x.dtype, device=x.device))
