"""sdediff: diffusion models as continuous-time SDEs and ODEs.

Forward processes (:class:`VPSDE`, :class:`SubVPSDE`, :class:`VESDE`), their reverse-time SDE and
probability-flow ODE, pluggable solvers, the sampling loops, the classic samplers (DDPM, DDIM,
annealed Langevin, predictor–corrector) as their discretizations, guidance and inpainting as
transformations of the score and of the sampling loop, exact log-likelihoods, training objectives
(score matching, improved DDPM's bound, consistency models, progressive distillation), and an
exact Gaussian-mixture test bed.
"""

from .analytic import GaussianMixture
from .calibration import GridCalibration, calibrate_grid
from .classic import sample_ald, sample_ddim, sample_ddpm, sample_pc
from .compiled import CompiledODESampler, CompiledSDESampler
from .consistency import (ConsistencyFunction, consistency_distillation_loss, consistency_training_loss, ema_update,
                          karras_boundaries, sample_consistency)
from .distillation import progressive_distillation_loss, progressive_distillation_target, snr_weight
from .grids import discrete_time_grid, time_grid
from .guidance import classifier_free_guidance, classifier_guidance, drop_condition
from .inpaint import sample_inpaint
from .integrate import NonFiniteError, Solution, integrate
from .likelihood import Evaluation, Likelihood, bits_per_dim, decode, encode, evaluate, log_likelihood
from .losses import LossHistorySampler, dsm_loss, ssm_loss
from .models import LearnedVariance, as_score_fn, discrete_score_fn, from_diffusers, score_from_eps, score_from_v, score_from_x0
from .nets import TimeMLP
from .reverse import ReverseProcess
from .sampling import sample_ode, sample_sde
from .schedules import CosineSchedule, DiscreteSchedule, LinearSchedule, Schedule
from .sdes import EDMSDE, SDE, SubVPSDE, VESDE, VPSDE
from .solvers import (AnnealedLangevin, Corrector, LangevinCorrector, ODESolver, SDESolver, Solver, available_solvers,
                      get_solver, register_solver)
from .terms import ODETerm, SDETerm
from .vlb import discretized_gaussian_log_likelihood, hybrid_loss, normal_kl, variational_bound

__version__ = "0.1.0"

__all__ = [
    "SDE", "VPSDE", "SubVPSDE", "VESDE", "EDMSDE", "ReverseProcess",
    "Schedule", "LinearSchedule", "CosineSchedule", "DiscreteSchedule",
    "sample_ode", "sample_sde", "CompiledODESampler", "CompiledSDESampler", "integrate", "Solution", "NonFiniteError", "time_grid", "discrete_time_grid",
    "calibrate_grid", "GridCalibration",
    "sample_ddpm", "sample_ddim", "sample_ald", "sample_pc", "Corrector", "LangevinCorrector", "AnnealedLangevin",
    "ODETerm", "SDETerm", "Solver", "ODESolver", "SDESolver", "available_solvers", "get_solver", "register_solver",
    "GaussianMixture", "as_score_fn", "score_from_eps", "score_from_x0", "score_from_v", "discrete_score_fn",
    "from_diffusers", "log_likelihood", "bits_per_dim", "encode", "decode", "Likelihood", "evaluate",
    "Evaluation", "classifier_guidance", "classifier_free_guidance", "drop_condition", "sample_inpaint", "LearnedVariance", "dsm_loss", "ssm_loss", "LossHistorySampler", "hybrid_loss",
    "variational_bound", "normal_kl", "discretized_gaussian_log_likelihood", "ConsistencyFunction",
    "consistency_training_loss", "consistency_distillation_loss", "sample_consistency", "karras_boundaries",
    "ema_update", "progressive_distillation_target", "progressive_distillation_loss", "snr_weight", "TimeMLP",
]
