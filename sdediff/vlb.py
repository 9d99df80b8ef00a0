"""Discrete-time variational bound and hybrid loss of improved DDPM (Nichol & Dhariwal 2021).

Timesteps ``n = 0 .. N-1`` of ``sde = VPSDE.from_betas(betas)`` (``t_n = (n + 1) / N``); ``x_n``
is the latent ``sqrt(abar_n) x + sqrt(1 - abar_n) eps`` of the data ``x`` (the paper's
``x_{n+1}``), with ``abar_n = prod_{m <= n} (1 - beta_m)`` and ``abar_{-1} = 1``. The bound is

    -log p(x) <= L_prior + sum_{n >= 1} L_n + L_0,
    L_prior = KL(q(x_{N-1} | x) || N(0, I)),
    L_n     = KL(q(x_{n-1} | x_n, x) || p(x_{n-1} | x_n)),   n >= 1,
    L_0     = -log p(x | x_0)   (discretized Gaussian decoder over 8-bit bins),

each averaged over dimensions and divided by ``log 2`` (bits/dim). The posterior is
``q(x_{n-1} | x_n, x) = N(c1_n x + c2_n x_n, beta~_n)`` with ``c1 = beta_n sqrt(abar_{n-1}) / (1 - abar_n)``,
``c2 = sqrt(1 - beta_n) (1 - abar_{n-1}) / (1 - abar_n)``, ``beta~_n = beta_n (1 - abar_{n-1}) / (1 - abar_n)``;
``beta~_0 = 0``, so its log is clipped to ``log beta~_1`` (as iDDPM). The model's mean is the
posterior mean at its predicted ``x``. All constants are computed in float64.

Model layout (diffusers / iDDPM): ``model(x_n, n) -> (batch, 2C, ...)`` with the prediction
(``eps``, ``x0`` or ``v``) in the first ``C`` channels and ``v_var in [-1, 1]`` in the last ``C``;
``log var = frac log beta_n + (1 - frac) log beta~_n`` with ``frac = (v_var + 1) / 2`` (so
``v_var = 1`` gives ``beta_n``, ``-1`` gives ``beta~_n``; values outside extrapolate, as in iDDPM).
A fixed-variance model (``variance="beta"`` or ``"posterior"``) outputs the prediction only; at
``n = 0`` both use ``beta~_1`` (iDDPM's choice for its decoder).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from . import _checks
from .models import _to_score
from .sdes import SDE, VPSDE, bcast

VARIANCES = ("learned", "beta", "posterior")
_LOG2 = math.log(2.0)


class Posterior(NamedTuple):
    """Per-timestep float64 constants ``(N,)`` of a discrete VP process (see the module docstring)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor  # alpha_n of x_n = alpha_n x + sigma_n eps
    sqrt_one_minus_alphas_cumprod: torch.Tensor  # sigma_n
    mean_coef_x0: torch.Tensor  # c1
    mean_coef_xn: torch.Tensor  # c2
    variance: torch.Tensor  # beta~_n (0 at n = 0)
    log_variance_clipped: torch.Tensor  # log beta~_n, with log beta~_1 at n = 0


def posterior_coefficients(sde: SDE) -> Posterior:
    """The constants of ``q(x_{n-1} | x_n, x)`` for ``sde = VPSDE.from_betas(betas)``."""
    if not isinstance(sde, VPSDE) or sde.discrete_steps is None:
        raise TypeError("sde must be a VPSDE with discrete betas: build it with VPSDE.from_betas(betas) "
                        f"or VPSDE.from_alphas_cumprod(alphas_cumprod), got {sde!r}")
    betas = sde.schedule.discrete_betas(sde.discrete_steps).to(torch.float64)
    abar = torch.exp(torch.cumsum(torch.log1p(-betas), 0))  # = alpha(t_n)^2 of the sde
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    one_minus = -torch.expm1(torch.cumsum(torch.log1p(-betas), 0))
    var = betas * (1.0 - abar_prev) / one_minus
    log_var = torch.log(torch.cat([var[1:2], var[1:]])) if len(betas) > 1 else torch.log(betas)
    return Posterior(betas, abar, abar.sqrt(), one_minus.sqrt(), betas * abar_prev.sqrt() / one_minus,
                     (1.0 - betas).sqrt() * (1.0 - abar_prev) / one_minus, var, log_var)


def _take(c: torch.Tensor, n: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return bcast(c.to(x.device)[n].to(x.dtype), x)


def _timesteps(n, x: torch.Tensor, N: int, name: str = "n") -> torch.Tensor:
    if isinstance(n, int) and not isinstance(n, bool):
        n = torch.full((x.shape[0],), n, dtype=torch.long, device=x.device)
    if not isinstance(n, torch.Tensor) or n.dtype != torch.long or n.shape != (x.shape[0],):
        raise TypeError(f"{name} must be an int or a long tensor of shape ({x.shape[0]},) (batch,) in [0, {N - 1}]")
    if bool(((n < 0) | (n >= N)).any()):
        raise ValueError(f"{name} must lie in [0, {N - 1}] (0-based), got {n.min().item()} .. {n.max().item()}")
    return n.to(x.device)


def q_posterior(sde: SDE, x0: torch.Tensor, x_n: torch.Tensor, n) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q(x_{n-1} | x_n, x0)``: mean (shape of ``x0``), variance ``beta~_n`` and clipped log-variance ``(batch,)``."""
    x0, x_n = _checks.batched("x0", x0), _checks.batched("x_n", x_n)
    if x_n.shape != x0.shape:
        raise ValueError(f"x_n must have the shape of x0 {tuple(x0.shape)}, got {tuple(x_n.shape)}")
    c = posterior_coefficients(sde)
    n = _timesteps(n, x0, len(c.betas))
    mean = _take(c.mean_coef_x0, n, x0) * x0 + _take(c.mean_coef_xn, n, x0) * x_n
    return mean, c.variance.to(x0)[n], c.log_variance_clipped.to(x0)[n]


def learned_log_variance(v: torch.Tensor, n, sde: SDE) -> torch.Tensor:
    """``log var = frac log beta_n + (1 - frac) log beta~_n``, ``frac = (v + 1) / 2``; shape of ``v``."""
    v = _checks.batched("v", v)
    c = posterior_coefficients(sde)
    n = _timesteps(n, v, len(c.betas))
    frac = (v + 1.0) / 2.0
    return frac * _take(c.betas.log(), n, v) + (1.0 - frac) * _take(c.log_variance_clipped, n, v)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` in nats (arguments broadcast)."""
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(a) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor | None = None, *,
                                        logvar: torch.Tensor | None = None, bins: int = 256, low: float = -1.0,
                                        high: float = 1.0) -> torch.Tensor:
    """Elementwise ``log P(x)`` under ``N(mean, e^{2 log_scale})``, ``x`` on the grid ``low + k (high-low) / (bins-1)``.

    ``P(x) = Phi((x + h - mean) / s) - Phi((x - h - mean) / s)``, ``h`` half the grid spacing; the
    first and last bins extend to ``-inf`` and ``+inf``, so the ``bins`` probabilities sum to 1.
    ``x`` is snapped to the nearest grid value. Give ``log_scale`` or ``logvar = 2 log_scale``.
    (iDDPM's bins: ``bins`` values centred on the grid, width ``(high - low) / (bins - 1)``;
    :func:`sdediff.bits_per_dim` dequantizes into ``bins`` cells of width ``(high - low) / bins``.)
    Computed as ``log Phi(v) + log(1 - Phi(u)/Phi(v))`` on the tail nearer the mean (no cancellation).
    """
    if (log_scale is None) == (logvar is None):
        raise TypeError("give exactly one of log_scale and logvar")
    log_scale = 0.5 * _checks.float_tensor("logvar", logvar) if log_scale is None else log_scale
    for name, value in (("x", x), ("mean", mean), ("log_scale", log_scale)):
        _checks.float_tensor(name, value)
    bins = _checks.positive_int("bins", bins)
    if bins < 2 or not high > low:
        raise ValueError(f"bins must be >= 2 and high > low, got bins={bins}, low={low}, high={high}")
    step = (high - low) / (bins - 1)
    if bool(((x < low - step / 2) | (x > high + step / 2) | ~torch.isfinite(x)).any()):
        raise ValueError(f"x must lie in [low, high] = [{low:g}, {high:g}]")
    k = torch.round((x - low) / step).clamp(0, bins - 1)
    centered = low + k * step - mean
    inv_s = torch.exp(-log_scale)
    z_lo, z_hi = (centered - step / 2) * inv_s, (centered + step / 2) * inv_s
    flip = (z_lo + z_hi) > 0  # use the reflected bin (-z_hi, -z_lo) when it lies on the right of the mean
    u, v = torch.where(flip, -z_hi, z_lo), torch.where(flip, -z_lo, z_hi)
    log_v = torch.special.log_ndtr(v)
    gap = (torch.special.log_ndtr(u) - log_v).clamp(max=-torch.finfo(x.dtype).tiny)
    mid = log_v + torch.log(-torch.expm1(gap))
    first, last = torch.special.log_ndtr(z_hi), torch.special.log_ndtr(-z_lo)
    return torch.where(k == 0, first, torch.where(k == bins - 1, last, mid))


def _mean_flat(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0], -1).mean(1)


def _split(out: torch.Tensor, x: torch.Tensor, variance: str):
    want = 2 * x.shape[1] if variance == "learned" else x.shape[1]
    if x.dim() < 2 or out.shape != (x.shape[0], want) + x.shape[2:]:
        raise ValueError(f"model output must have shape {(x.shape[0], want) + tuple(x.shape[2:])} for "
                         f"variance={variance!r} (channel dim 1), got {tuple(out.shape)}")
    return (out[:, : x.shape[1]], out[:, x.shape[1]:]) if variance == "learned" else (out, None)


def _check_options(sde, variance, prediction):
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if prediction not in ("eps", "x0", "v"):
        raise ValueError(f"prediction must be one of ('eps', 'x0', 'v'), got {prediction!r}")
    return posterior_coefficients(sde)


def _term(c: Posterior, pred, v_var, x0, x_n, n, variance, prediction, clip_x0, bins, low, high):
    """``L_n`` in bits/dim ``(batch,)``: the KL for ``n >= 1``, the decoder NLL where ``n == 0``."""
    a, s = _take(c.sqrt_alphas_cumprod, n, x0), _take(c.sqrt_one_minus_alphas_cumprod, n, x0)
    x0_hat = (x_n + s**2 * _to_score(pred, x_n, a, s, prediction)) / a  # Tweedie, from any output
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
    mean = _take(c.mean_coef_x0, n, x0) * x0_hat + _take(c.mean_coef_xn, n, x0) * x_n
    if variance == "learned":
        frac = (v_var + 1.0) / 2.0
        logvar = frac * _take(c.betas.log(), n, x0) + (1.0 - frac) * _take(c.log_variance_clipped, n, x0)
    else:
        fixed = c.log_variance_clipped
        if variance == "beta":
            fixed = torch.cat([fixed[:1], c.betas[1:].log()])
        logvar = _take(fixed, n, x0).expand_as(x0)
    true_mean = _take(c.mean_coef_x0, n, x0) * x0 + _take(c.mean_coef_xn, n, x0) * x_n
    kl = _mean_flat(normal_kl(true_mean, _take(c.log_variance_clipped, n, x0), mean, logvar))
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, logvar=logvar, bins=bins, low=low, high=high))
    return torch.where(n == 0, nll, kl) / _LOG2


def _noised(c, x0, n, noise):
    return _take(c.sqrt_alphas_cumprod, n, x0) * x0 + _take(c.sqrt_one_minus_alphas_cumprod, n, x0) * noise


class HybridLoss(NamedTuple):
    """Per-sample ``(batch,)``: ``loss = mse + lam N vlb``; ``mse`` (L_simple); ``vlb`` = ``L_n`` in bits/dim."""

    loss: torch.Tensor
    mse: torch.Tensor
    vlb: torch.Tensor
    timesteps: torch.Tensor


def hybrid_loss(model, sde: SDE, x0: torch.Tensor, *, lam: float = 0.001, timesteps=None, noise=None,
                prediction: str = "eps", bins: int = 256, low: float = -1.0, high: float = 1.0,
                generator=None) -> HybridLoss:
    """iDDPM's ``L_hybrid = L_simple + lam L_vlb`` for a learned-variance ``model(x_n, n) -> (batch, 2C, ...)``.

    ``L_simple = mean((pred - target)^2)`` (target ``eps``, ``x0`` or ``v = alpha eps - sigma x0``)
    and ``L_vlb = N L_n`` (one-sample estimate of ``sum_n L_n``; iDDPM's ``vb * N / 1000`` with
    ``lam = 1e-3``), with the mean's branch detached in ``L_vlb``: the variance channels learn only
    from ``L_vlb``, the prediction only from ``L_simple``. ``timesteps`` (long ``(batch,)``) default
    to uniform draws; with a :class:`LossHistorySampler`, weight: ``(loss * weights).mean()``.
    """
    _checks.callable_("model", model)
    x0 = _checks.batched("x0", x0)
    lam = _checks.real("lam", lam, low=0.0)
    c = _check_options(sde, "learned", prediction)
    N = len(c.betas)
    if timesteps is None:
        timesteps = torch.randint(0, N, (x0.shape[0],), generator=generator, device=x0.device)
    n = _timesteps(timesteps, x0, N, "timesteps")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    elif not isinstance(noise, torch.Tensor) or noise.shape != x0.shape:
        raise ValueError(f"noise must be a tensor of the shape of x0 {tuple(x0.shape)}")
    x_n = _noised(c, x0, n, noise)
    pred, v_var = _split(model(x_n, n), x0, "learned")
    a, s = _take(c.sqrt_alphas_cumprod, n, x0), _take(c.sqrt_one_minus_alphas_cumprod, n, x0)
    target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[prediction]
    mse = _mean_flat((pred - target) ** 2)
    vlb = _term(c, pred.detach(), v_var, x0, x_n, n, "learned", prediction, None, bins, low, high)
    return HybridLoss(mse + lam * N * vlb, mse, vlb, n)


class VariationalBound(NamedTuple):
    """Bits/dim per sample ``(batch,)``: ``bpd = prior + decoder + diffusion``; ``terms (batch, N)``: ``L_n``."""

    bpd: torch.Tensor
    prior: torch.Tensor
    decoder: torch.Tensor
    diffusion: torch.Tensor
    terms: torch.Tensor


@torch.no_grad()
def variational_bound(model, sde: SDE, x0: torch.Tensor, *, variance: str = "learned", prediction: str = "eps",
                      clip_x0: float | None = None, bins: int = 256, low: float = -1.0, high: float = 1.0,
                      generator=None, progress: bool = False) -> VariationalBound:
    """The full discrete-time bound ``L_prior + sum_{n>=1} L_n + L_0`` on ``-log2 P(x0)`` per dim (see module doc).

    ``x0: (batch, C, ...)`` on the ``bins``-level grid of ``[low, high]``; every ``L_n`` uses a fresh
    noise draw (one model call per timestep, batched over samples). ``model`` as in :func:`hybrid_loss`
    for ``variance="learned"``, else it outputs the prediction only. ``clip_x0`` clips the predicted
    ``x0`` (iDDPM's ``clip_denoised``). Compare with :func:`sdediff.bits_per_dim` (exact ODE likelihood).
    """
    _checks.callable_("model", model)
    x0 = _checks.batched("x0", x0)
    c = _check_options(sde, variance, prediction)
    if clip_x0 is not None:
        clip_x0 = _checks.real("clip_x0", clip_x0, low=0.0, low_open=True)
    N, B = len(c.betas), x0.shape[0]
    terms = torch.zeros(B, N, dtype=x0.dtype, device=x0.device)
    for i in tqdm(range(N - 1, -1, -1), disable=not progress, desc="VLB"):
        n = torch.full((B,), i, dtype=torch.long, device=x0.device)
        x_n = _noised(c, x0, n, torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device))
        pred, v_var = _split(model(x_n, n), x0, variance)
        terms[:, i] = _term(c, pred, v_var, x0, x_n, n, variance, prediction, clip_x0, bins, low, high)
    a_last, logvar_last = c.sqrt_alphas_cumprod[-1].to(x0), torch.log1p(-c.alphas_cumprod[-1]).to(x0)
    prior = _mean_flat(normal_kl(a_last * x0, logvar_last, 0.0, 0.0)) / _LOG2
    return VariationalBound(prior + terms.sum(1), prior, terms[:, 0], terms[:, 1:].sum(1), terms)
