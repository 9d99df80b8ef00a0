"""Solvers, one small class per method, registered by name (see :func:`available_solvers`)."""

from .base import (MultistepSolver, ODESolver, SDESolver, Solver, SolverInfo, available_solvers, get_solver,
                   register_solver)
from .ode import RK4, Euler, Heun, Midpoint
from .sde import EulerMaruyama, Milstein
from .transition import DDIM, Ancestral, ReverseDiffusion
from .langevin import AnnealedLangevin, Corrector, LangevinCorrector
from .exponential import DPMSolver
from .multistep import LMS, DPMSolverPP2M, DPMSolverPP3M, SDEDPMSolverPP2M, UniPC
from .external import TorchdiffeqSolver, TorchsdeSolver

__all__ = [
    "Solver", "ODESolver", "SDESolver", "SolverInfo", "available_solvers", "get_solver", "register_solver",
    "Euler", "Midpoint", "Heun", "RK4", "EulerMaruyama", "Milstein", "TorchdiffeqSolver", "TorchsdeSolver",
    "DDIM", "Ancestral", "ReverseDiffusion", "Corrector", "LangevinCorrector", "AnnealedLangevin",
    "MultistepSolver", "DPMSolver", "DPMSolverPP2M", "DPMSolverPP3M", "UniPC", "LMS", "SDEDPMSolverPP2M",
]
