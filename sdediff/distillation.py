"""Progressive distillation (Salimans & Ho 2022): a student learns in one DDIM step what the teacher does in two.

For any forward SDE here (``x_t = alpha_t x_0 + sigma_t eps``; VP, sub-VP, VE, EDM), DDIM's step from
``t`` to ``s < t`` with a prediction ``x0`` (and ``eps = (x_t - alpha_t x0) / sigma_t``) is

    x_s = alpha_s x0 + sigma_s eps = (sigma_s / sigma_t) x_t + (alpha_s - (sigma_s / sigma_t) alpha_t) x0,

affine in ``x0``. The teacher takes two DDIM steps, ``t -> u = (t + s) / 2 -> s`` (the midpoint in
``t``: the paper's ``t' = t - 0.5/N`` on its grid ``t = i/N``), reaching ``x_s``; solving the line above
for ``x0`` gives the student's target

    x̃ = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t),

so that one DDIM step of a student predicting ``x̃`` at ``t`` lands exactly on the teacher's ``x_s``.
The denominator is ``sigma_s (alpha_s / sigma_s - alpha_t / sigma_t) > 0`` because the SNR decreases.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks
from .models import PREDICTIONS, _to_score
from .reverse import ReverseProcess
from .sdes import SDE, bcast, check_sde
from .solvers.base import get_solver

WEIGHTINGS = ("truncated_snr", "snr_plus_one", "snr", "constant")


class DistillationTarget(NamedTuple):
    """Targets ``(batch, *dims)``: ``x0`` (``x̃``), ``eps = (x_t - alpha_t x̃) / sigma_t``, the teacher's ``x_s``."""

    x0: torch.Tensor
    eps: torch.Tensor
    x_s: torch.Tensor


def snr_weight(sde: SDE, t, weighting: str = "truncated_snr") -> torch.Tensor:
    """Weight of the x0-space MSE at ``t``, shape of ``t``; ``SNR = alpha^2 / sigma^2``.

    ``"truncated_snr"``: ``max(SNR, 1)`` (the paper's choice); ``"snr_plus_one"``: ``SNR + 1`` (the
    v-prediction MSE); ``"snr"``: ``SNR`` (the eps-prediction MSE); ``"constant"``: 1 (the x0 MSE).
    """
    check_sde(sde)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    t = sde._time(t)
    if weighting == "constant":
        return torch.ones_like(t)
    snr = torch.exp(sde._log_snr(t))
    if weighting == "truncated_snr":
        return snr.clamp(min=1.0)
    return snr + 1.0 if weighting == "snr_plus_one" else snr


def _times(sde: SDE, x_t: torch.Tensor, t, s) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` and ``s`` as ``(batch,)`` tensors in ``x_t``'s dtype, checked: ``0 <= s < t <= T``."""
    batch = x_t.shape[0]
    t, s = (sde._time(v, x_t, name).expand(batch) for v, name in ((t, "t"), (s, "s")))
    if not bool((s < t).all()):
        raise ValueError("s must be smaller than t for every sample (the teacher steps from t down to s)")
    return t, s


@torch.no_grad()
def progressive_distillation_target(teacher_score_fn, sde: SDE, x_t: torch.Tensor, t, s) -> DistillationTarget:
    """The student's target for the step ``t -> s`` from two teacher DDIM steps ``t -> (t + s)/2 -> s``.

    ``teacher_score_fn(x, t)`` (``t: (batch,)``); ``x_t: (batch, *dims)``; ``t``, ``s``: floats, 0-d or
    ``(batch,)`` tensors with ``0 <= s < t <= sde.T``. Uses the registered ``"ddim"`` solver's step (per-sample
    times). Computed under ``no_grad``. Returns a :class:`DistillationTarget`.
    """
    _checks.callable_("teacher_score_fn", teacher_score_fn)
    check_sde(sde)
    x_t = _checks.batched("x_t", x_t)
    t, s = _times(sde, x_t, t, s)
    term = ReverseProcess(sde, teacher_score_fn, 0.0).ode_term()
    ddim = get_solver("ddim", "ode")
    u = 0.5 * (t + s)
    x_s = ddim.step(term, ddim.step(term, x_t, t, u), u, s)
    (a_t, sig_t), (a_s, sig_s) = sde._alpha_sigma(t), sde._alpha_sigma(s)
    ratio = sig_s / sig_t
    x0 = (x_s - bcast(ratio, x_t) * x_t) / bcast(a_s - ratio * a_t, x_t)
    eps = (x_t - bcast(a_t, x_t) * x0) / bcast(sig_t, x_t)
    return DistillationTarget(x0, eps, x_s)


def progressive_distillation_loss(student, teacher_score_fn, sde: SDE, x0: torch.Tensor, *, N: int,
                                  prediction: str = "x0", weighting: str = "truncated_snr",
                                  generator=None) -> torch.Tensor:
    """Progressive distillation loss per sample, shape ``(batch,)``, for a student of ``N`` steps.

    Draws ``i ~ U{1..N}`` (``randint``), then ``eps ~ N(0, I)``, from ``generator`` on ``x0``'s device; sets
    ``t = i T / N``, ``s = (i - 1) T / N`` (the teacher's grid has ``2N`` steps), ``x_t = alpha_t x0 +
    sigma_t eps``, and returns

        w(t) mean_d (x̂0(x_t, t) - x̃)^2,

    with ``x̃`` from :func:`progressive_distillation_target` (a constant: no gradient reaches the teacher)
    and ``x̂0`` the student's output ``student(x_t, t)`` turned into an x0 prediction (``prediction``:
    ``"x0"``, ``"eps"``, ``"v"`` (``alpha eps - sigma x0``) or ``"score"``). ``w``: :func:`snr_weight`'s
    ``weighting`` (default ``"truncated_snr"``, ``max(SNR, 1)``, the paper's).
    """
    _checks.callable_("student", student)
    _checks.callable_("teacher_score_fn", teacher_score_fn)
    check_sde(sde)
    x0 = _checks.batched("x0", x0)
    N = _checks.positive_int("N", N)
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    like = dict(dtype=x0.dtype, device=x0.device)
    i = torch.randint(1, N + 1, (x0.shape[0],), generator=generator, device=x0.device).to(x0.dtype)
    t, s = i * sde.T / N, (i - 1.0) * sde.T / N  # exact end points: i T is exact
    noise = torch.randn(x0.shape, generator=generator, **like)
    alpha, sigma = (bcast(c, x0) for c in sde._alpha_sigma(t))
    x_t = alpha * x0 + sigma * noise
    target = progressive_distillation_target(teacher_score_fn, sde, x_t, t, s).x0
    out = student(x_t, t)
    if not isinstance(out, torch.Tensor) or out.shape != x0.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"student must return a tensor of the shape of x0 {tuple(x0.shape)}, got {got}")
    x0_hat = (x_t + sigma**2 * _to_score(out, x_t, alpha, sigma, prediction)) / alpha  # Tweedie, from any output
    return snr_weight(sde, t, weighting) * (x0_hat - target).pow(2).reshape(x0.shape[0], -1).mean(1)
