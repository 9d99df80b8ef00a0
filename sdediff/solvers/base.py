"""Solver base classes and the registry that maps names to solvers.

A fixed-step solver is a small stateless class with its order and one pure ``step``; the loop in
:mod:`sdediff.integrate` owns the stepping, the time grid and the Brownian increments.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..terms import ODETerm, SDETerm


class Solver:
    """Common metadata.

    ``order``: the global order; for SDE solvers the strong order for general diagonal noise, and
    ``additive_order`` the strong order for additive noise (every reverse diffusion here), where
    most methods gain. ``evals_per_step``: drift (score) evaluations per step, 0 when variable.
    ``needs_process``: the step reads ``term.process`` (the reverse process of a forward SDE with
    closed-form ``alpha``, ``sigma``) instead of the bare vector field. ``multistep``: the solver
    keeps a state between steps (see :class:`MultistepSolver`). ``default_grid``: the time grid
    ``sample_ode``/``sample_sde`` use with it unless told otherwise.
    """

    name: str = ""
    kind: str = ""
    order: float = 0
    additive_order: float | None = None
    evals_per_step: int = 1
    adaptive: bool = False
    needs_process: bool = False
    multistep: bool = False
    default_grid: str = "uniform"

    def check_term(self, term) -> None:
        """Called once by the integration loop before stepping: raise if ``term`` cannot be solved."""
        if self.needs_process and getattr(term, "process", None) is None:
            raise TypeError(f"solver {self.name!r} steps a diffusion's reverse process; give it a term built by "
                            "ReverseProcess.ode_term() / .sde_term() (as sample_ode and sample_sde do)")

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, order={self.order})"


class ODESolver(Solver):
    kind = "ode"

    def step(self, term: ODETerm, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
        """One step of ``dx/dt = term.vector_field(x, t)`` from ``t0`` to ``t1`` (either direction); 0-d times."""
        raise NotImplementedError


class SDESolver(Solver):
    kind = "sde"

    def step(self, term: SDETerm, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, dw) -> torch.Tensor:
        """One step from ``t0`` to ``t1`` given the Brownian increment ``dw`` (variance ``|t1 - t0|``).

        ``dw=None`` asks for the noise-free step (the conditional mean of the update).
        """
        raise NotImplementedError


class MultistepSolver:
    """Mixin for solvers that reuse earlier evaluations.

    ``init(term, x, ts)`` returns the state before the first step (it may precompute the
    coefficients of the whole grid, once); the loop then calls
    ``step(term, x, t0, t1, state) -> (x1, state)`` for ODEs and
    ``step(term, x, t0, t1, dw, state) -> (x1, state)`` for SDEs, on the consecutive steps of ``ts``.
    """

    multistep = True

    def init(self, term, x: torch.Tensor, ts: torch.Tensor):
        raise NotImplementedError


class SolverInfo(NamedTuple):
    kind: str
    order: float
    evals_per_step: int
    adaptive: bool
    additive_order: float | None
    needs_process: bool = False
    multistep: bool = False
    default_grid: str = "uniform"


_REGISTRY: dict[str, Solver] = {}


def register_solver(solver=None, *, overwrite: bool = False):
    """Register a solver instance, or a solver class (instantiated without arguments), by its ``name``.

    Usable as a class decorator (``@register_solver`` or ``@register_solver(overwrite=True)``).
    A name already taken raises unless ``overwrite=True``.
    """
    if solver is None:
        return lambda s: register_solver(s, overwrite=overwrite)
    instance = solver() if isinstance(solver, type) else solver
    if not isinstance(instance, Solver):
        raise TypeError(f"solver must be a sdediff Solver subclass or instance, got {type(instance).__name__}")
    if not instance.name or instance.kind not in ("ode", "sde"):
        raise ValueError("a registered solver needs a non-empty name and kind 'ode' or 'sde'")
    if instance.name in _REGISTRY and not overwrite:
        raise ValueError(f"a solver named {instance.name!r} is registered already; pass overwrite=True to replace it")
    _REGISTRY[instance.name] = instance
    return solver


def available_solvers(kind: str | None = None) -> dict[str, SolverInfo]:
    """Registered solvers by name, with their kind ('ode' or 'sde'), order and cost per step."""
    if kind not in (None, "ode", "sde"):
        raise ValueError(f"kind must be None, 'ode' or 'sde', got {kind!r}")
    return {
        name: SolverInfo(s.kind, s.order, s.evals_per_step, s.adaptive, s.additive_order, s.needs_process,
                         s.multistep, s.default_grid)
        for name, s in sorted(_REGISTRY.items())
        if kind is None or s.kind == kind
    }


def get_solver(solver, kind: str) -> Solver:
    """Resolve a name or an instance to a solver of the given kind, or raise naming the valid ones."""
    if isinstance(solver, str):
        if solver not in _REGISTRY:
            names = ", ".join(available_solvers(kind))
            raise ValueError(f"unknown solver {solver!r}; valid {kind.upper()} solvers: {names}")
        solver = _REGISTRY[solver]
    elif isinstance(solver, type) and issubclass(solver, Solver):
        solver = solver()
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a name or a sdediff Solver instance, got {type(solver).__name__}")
    if solver.kind != kind:
        names = ", ".join(available_solvers(kind))
        raise ValueError(f"solver {solver.name!r} is an {solver.kind.upper()} solver; expected one of: {names}")
    return solver
