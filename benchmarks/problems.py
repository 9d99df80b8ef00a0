"""The benchmark problems: exact Gaussian mixtures under DDPM's linear schedule, and their reference solutions.

Shared by ``solver_accuracy.py`` and ``calibrated_grids.py``; ``solver_accuracy.py``'s docstring
describes the problems, the process and the reference.
"""

from __future__ import annotations

import math

import torch

import sdediff

import peers

F64 = torch.float64
N_TRAIN = 1000
BETAS = torch.linspace(1e-4, 0.02, N_TRAIN, dtype=F64)
SDE = sdediff.VPSDE.from_betas(BETAS)
T_START, T_END = 1.0, 1.0 / N_TRAIN
REF_TOL = 1e-10  # of the reference solves
SCHEDULE = dict(num_train_timesteps=N_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")  # diffusers'


def make_problem(name: str, batch: int | None, seed: int):
    if name == "ring2d":
        k = 8
        angles = torch.arange(k, dtype=F64) * (2 * math.pi / k)
        means = 2.0 * torch.stack([angles.cos(), angles.sin()], 1)
        gm = sdediff.GaussianMixture(torch.full((k,), 1.0 / k, dtype=F64), means, 0.03)
        desc = "2-D, 8 equal components on a circle of radius 2, std 0.03"
        default_batch = 256
    elif name == "mix64d":
        g = torch.Generator().manual_seed(1234)
        k, d = 8, 64
        weights = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.07, 0.05, 0.03], dtype=F64)
        directions = torch.randn(k, d, generator=g, dtype=F64)
        norms = 3.0 + 2.0 * torch.rand(k, 1, generator=g, dtype=F64)
        means = directions / directions.norm(dim=1, keepdim=True) * norms
        stds = 0.1 + 0.4 * torch.rand(k, generator=g, dtype=F64)
        gm = sdediff.GaussianMixture(weights, means, stds)
        desc = ("64-D, 8 components, weights 0.30/0.20/0.15/0.10/0.10/0.07/0.05/0.03, mean norms 3-5, "
                "isotropic stds 0.1-0.5 (seed 1234)")
        default_batch = 128
    else:
        raise ValueError(f"unknown problem {name!r}")
    batch = default_batch if batch is None else batch
    x_T = SDE.prior_sample((batch, gm.dim), generator=torch.Generator().manual_seed(seed), dtype=F64)
    params = {"weights": gm.weights.tolist(), "means": gm.means.tolist(), "stds": gm.stds[:, 0].tolist()}
    return {"name": name, "description": desc, "gm": gm, "x_T": x_T, "batch": batch, "dim": gm.dim,
            "params": params}


def _alpha(t: float) -> torch.Tensor:
    return SDE.marginal(torch.tensor(t, dtype=F64))[0]


def sigma_ve(t) -> torch.Tensor:
    alpha, sigma = SDE.marginal(torch.as_tensor(t, dtype=F64))
    return sigma / alpha


def reference(score_fn, x_T, tol):
    """The PF-ODE solution at ``t_end`` from ``x_T``, by dopri5 in ``u = log sigma_VE`` (smooth there)."""
    denoise = peers.ve_denoiser(score_fn, SDE)

    def field(x_ve, u):
        return x_ve - denoise(x_ve, torch.exp(u).expand(x_ve.shape[0]))

    us = torch.log(torch.stack([sigma_ve(T_START), sigma_ve(T_END)]))
    sol = sdediff.integrate(sdediff.ODETerm(field), x_T / _alpha(T_START), us, solver="dopri5", rtol=tol, atol=tol)
    return _alpha(T_END) * sol.x, sol.nfe


def rmse(x, ref) -> float:
    return float(((x - ref) ** 2).mean().sqrt())
