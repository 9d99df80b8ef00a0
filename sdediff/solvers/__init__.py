"""Solvers, one small class per method, registered by name (see :func:`available_solvers`)."""

from .base import ODESolver, SDESolver, Solver, SolverInfo, available_solvers, get_solver, register_solver
from .ode import RK4, Euler, Heun, Midpoint
from .sde import EulerMaruyama, Milstein
from .transition import DDIM, Ancestral, ReverseDiffusion
from .langevin import AnnealedLangevin, Corrector, LangevinCorrector
from .external import TorchdiffeqSolver, TorchsdeSolver

__all__ = [
    "Solver", "ODESolver", "SDESolver", "SolverInfo", "available_solvers", "get_solver", "register_solver",
    "Euler", "Midpoint", "Heun", "RK4", "EulerMaruyama", "Milstein", "TorchdiffeqSolver", "TorchsdeSolver",
    "DDIM", "Ancestral", "ReverseDiffusion", "Corrector", "LangevinCorrector", "AnnealedLangevin",
]
