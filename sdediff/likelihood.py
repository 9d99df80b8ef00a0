"""Log-likelihoods by the instantaneous change of variables along the probability-flow ODE.

Along a solution of ``dx/dt = f(x, t) = f(t) x - 1/2 g(t)^2 score(x, t)``,
``d log p_t(x_t) / dt = -div f(x_t, t)``, so for data ``x`` at ``t_start``

    log p_{t_start}(x) = log p_T(z) + int_{t_start}^{T} div f(x_t, t) dt,   z = x_T,

with ``div f = d f(t) - 1/2 g(t)^2 div score``. The state ``(x, accumulated divergence)`` is
integrated by the same loop and solvers as sampling (adaptive ``dopri5`` by default).

* ``divergence="exact"``: the trace of the score's Jacobian, one vector-Jacobian product per
  coordinate, batched with ``torch.func.vmap`` over chunks of ``chunk_size`` coordinates
  (cost ~ ``d / chunk_size`` batched backward passes per evaluation; memory ~ ``chunk_size``), or
  looped one by one (``chunk_size=1``). Which is faster depends on the score and the batch
  (docs/likelihood.md gives measurements).
* ``divergence="hutchinson"``: ``eps^T J eps`` with ``probes`` fixed draws per sample
  (Rademacher or Gaussian), all in one batched product; unbiased, with a per-sample standard
  error over the probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import _checks
from ._tensors import time_dtype
from .integrate import integrate
from .reverse import ReverseProcess
from .sampling import _start, sample_ode
from .sdes import SDE, bcast
from .solvers.base import get_solver
from .terms import ODETerm

DIVERGENCES = ("exact", "hutchinson")
NOISES = ("rademacher", "gaussian")


@dataclass
class Likelihood:
    """``logp: (batch,)`` log-density at ``t_start`` in nats; ``z``: the latent at ``T``; ``nfe``: ODE
    field evaluations; ``stderr: (batch,)`` the Hutchinson standard error over probes (else None)."""

    logp: torch.Tensor
    z: torch.Tensor
    nfe: int
    stderr: Optional[torch.Tensor] = None


def _divergence_field(sde: SDE, score_fn, shape, divergence: str, probes: Optional[torch.Tensor], chunk_size: int):
    """The augmented field on flat states ``(batch, d + k)``: the drift, then ``k`` divergence columns."""
    batch, d = shape[0], math.prod(shape[1:])

    def score_flat(y, t):
        return score_fn(y.reshape(shape), t.expand(batch)).reshape(batch, d)

    def field(state, t):
        x = state[:, :d]
        score, vjp_fn = torch.func.vjp(lambda y: score_flat(y, t), x)
        if divergence == "exact" and chunk_size == 1:  # a plain loop: vmap of single vectors only adds overhead
            unit = torch.zeros(batch, d, dtype=x.dtype, device=x.device)
            div_score = torch.zeros(batch, 1, dtype=x.dtype, device=x.device)
            for i in range(d):
                unit[:, i] = 1.0
                div_score[:, 0] += vjp_fn(unit)[0][:, i]
                unit[:, i] = 0.0
        elif divergence == "exact":
            traces = []
            for start in range(0, d, chunk_size):
                idx = torch.arange(start, min(start + chunk_size, d), device=x.device)
                basis = torch.zeros(len(idx), batch, d, dtype=x.dtype, device=x.device)
                basis[torch.arange(len(idx)), :, idx] = 1.0
                rows = torch.func.vmap(vjp_fn)(basis)[0]  # (c, batch, d): row i of each sample's Jacobian
                traces.append(rows[torch.arange(len(idx)), :, idx].sum(0))
            div_score = sum(traces)[:, None]
        else:  # probes: (k, batch, d); eps^T J eps per probe
            products = torch.func.vmap(vjp_fn)(probes)[0]
            div_score = (products * probes).sum(-1).T  # (batch, k)
        f, g2 = sde._drift_coef(t), sde._g2(t)
        drift = bcast(f, x) * x - bcast(0.5 * g2, x) * score
        return torch.cat([drift, d * f - 0.5 * g2 * div_score], 1).detach()

    return field


def log_likelihood(score_fn, sde: SDE, x: torch.Tensor, *, divergence: str = "exact", probes: int = 1,
                   noise: str = "rademacher", solver="dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                   t_start: float = 1e-5, steps: int = 100, chunk_size: int = 16, generator=None) -> Likelihood:
    """``log p_{t_start}(x)`` per sample, integrating the probability-flow ODE from ``t_start`` to ``T``.

    ``x: (batch, *dims)``. ``solver``: any ODE solver; adaptive ones use ``rtol``/``atol`` (they
    apply to the divergence too), fixed-step ones take ``steps`` uniform steps. Hutchinson probes
    are drawn once per sample from ``generator`` and kept along the path. ``chunk_size``: coordinates
    per ``torch.func.vmap``-batched product of the exact divergence; 1 loops over them instead.
    """
    x, _ = _start(score_fn, sde, x, generator, None, None)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    probes = _checks.positive_int("probes", probes)
    chunk_size = _checks.positive_int("chunk_size", chunk_size)
    t_start = _checks.real("t_start", t_start, low=0.0, high=sde.T, low_open=True, high_open=True)
    batch, d = x.shape[0], x[0].numel()
    eps = None
    if divergence == "hutchinson":
        eps = torch.randn(probes, batch, d, generator=generator, dtype=x.dtype, device=x.device)
        if noise == "rademacher":
            eps = torch.sign(eps)
    k = 1 if divergence == "exact" else probes
    field = _divergence_field(sde, ReverseProcess(sde, score_fn).score, x.shape, divergence, eps, chunk_size)
    state = torch.cat([x.detach().reshape(batch, d), torch.zeros(batch, k, dtype=x.dtype, device=x.device)], 1)
    solver = get_solver(solver, "ode")
    n = 1 if solver.adaptive else _checks.positive_int("steps", steps)
    ts = torch.linspace(t_start, sde.T, n + 1, dtype=torch.float64)
    sol = integrate(ODETerm(field), state, ts, solver=solver, rtol=rtol, atol=atol)
    z = sol.x[:, :d].reshape(x.shape)
    deltas = sol.x[:, d:]  # (batch, k): int div f dt, per probe
    logp = sde.prior_logp(z)[:, None] + deltas
    stderr = logp.std(1) / math.sqrt(k) if divergence == "hutchinson" and k > 1 else None
    return Likelihood(logp.mean(1), z, sol.nfe, stderr)


def encode(score_fn, sde: SDE, x: torch.Tensor, *, t_start: float = 1e-5, solver="dopri5", rtol: float = 1e-5,
           atol: float = 1e-5) -> torch.Tensor:
    """The latent ``z = x_T`` of data ``x`` at ``t_start``, along the probability-flow ODE."""
    x, monitor = _start(score_fn, sde, x, None, None, None)
    t_start = _checks.real("t_start", t_start, low=0.0, high=sde.T, low_open=True, high_open=True)
    ts = torch.tensor([t_start, sde.T], dtype=time_dtype(x.dtype), device=x.device)
    return integrate(ReverseProcess(sde, monitor, 0.0).ode_term(), x, ts, solver=solver, rtol=rtol, atol=atol).x


def decode(score_fn, sde: SDE, z: torch.Tensor, *, t_start: float = 1e-5, solver="dopri5", rtol: float = 1e-5,
           atol: float = 1e-5) -> torch.Tensor:
    """The data ``x`` at ``t_start`` of the latent ``z`` at ``T`` (the inverse of :func:`encode`)."""
    return sample_ode(score_fn, sde, z, solver=solver, t_end=t_start, rtol=rtol, atol=atol).x


def bits_per_dim(score_fn, sde: SDE, x: torch.Tensor, *, bins: int = 256, low: float = -1.0, high: float = 1.0,
                 dequantizations: int = 1, generator=None, **kwargs) -> torch.Tensor:
    """Bits per dimension of discrete data with uniform dequantization, per sample ``(batch,)``.

    ``x`` holds the discrete values ``low + k (high - low) / (bins - 1)``, ``k = 0 .. bins - 1``
    (8-bit images scaled to [-1, 1] by ``2 k / 255 - 1``). Each draw moves ``k`` to ``k + u``,
    ``u ~ U[0, 1)``, in bins of width ``w = (high - low) / bins``; then
    ``log P(k) >= E_u[log p(y)] + D log w`` and ``bpd = -(E_u[log p(y)] + D log w) / (D log 2)``,
    averaged over ``dequantizations`` draws. ``kwargs`` go to :func:`log_likelihood`.
    """
    x = _checks.batched("x", x)
    bins = _checks.positive_int("bins", bins)
    dequantizations = _checks.positive_int("dequantizations", dequantizations)
    if not high > low:
        raise ValueError(f"high must exceed low, got low={low}, high={high}")
    width = (high - low) / bins
    k = torch.round((x - low) * (bins - 1) / (high - low)).clamp(0, bins - 1)
    d = x[0].numel()
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(dequantizations):
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        y = low + (k + u) * width
        total = total + log_likelihood(score_fn, sde, y, generator=generator, **kwargs).logp
    return -(total / dequantizations + d * math.log(width)) / (d * math.log(2.0))


@dataclass
class Evaluation:
    """Bits/dim over a dataset: ``mean``, its standard error ``stderr`` over samples, and ``count``."""

    mean: float
    stderr: float
    count: int


def evaluate(score_fn, sde: SDE, dataloader, *, seed: int = 0, progress: bool = True, **kwargs) -> Evaluation:
    """Mean and standard error of :func:`bits_per_dim` over ``dataloader`` (batches ``x`` or ``(x, ...)``).

    Under ``torch.distributed`` (e.g. launched with ``torchrun``; gloo on CPU, nccl on GPU), process
    ``r`` of ``W`` takes batches ``r, r + W, ...`` and the sums are all-reduced, so every process
    returns the whole dataset's result. Batch ``i`` dequantizes with a generator seeded
    ``seed + i``, so the result does not depend on the number of processes. ``kwargs`` go to
    :func:`bits_per_dim` (and on to :func:`log_likelihood`).
    """
    from tqdm.auto import tqdm

    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    sums = None
    for i, batch in enumerate(tqdm(dataloader, disable=not progress or rank != 0, desc="bits/dim")):
        if i % world != rank:
            continue
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        bpd = bits_per_dim(score_fn, sde, x, generator=torch.Generator(device=x.device).manual_seed(seed + i), **kwargs)
        part = torch.stack([bpd.sum(), (bpd**2).sum(), torch.tensor(float(len(bpd)), dtype=bpd.dtype)])
        sums = part if sums is None else sums + part
    if sums is None:
        sums = torch.zeros(3, dtype=torch.float64)
    sums = sums.to(torch.float64)
    if distributed:
        if dist.get_backend() == "nccl":
            sums = sums.cuda()
        dist.all_reduce(sums)
    total, total_sq, count = sums.tolist()
    if count < 1:
        raise ValueError("the dataloader yielded no samples")
    mean = total / count
    var = max(total_sq / count - mean**2, 0.0) * count / max(count - 1, 1)
    return Evaluation(mean, math.sqrt(var / count), int(count))
