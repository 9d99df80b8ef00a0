"""Adapters from network parameterizations to the ``score_fn(x, t)`` contract.

With ``x_t = alpha x_0 + sigma eps``:

* eps-prediction:  ``score = -eps / sigma``
* x0-prediction:   ``score = (alpha x0 - x) / sigma^2``
* v-prediction (``v = alpha eps - sigma x0``, Salimans & Ho):
  ``eps = (sigma x + alpha v) / (alpha^2 + sigma^2)``, then as eps.

Each ``model(x, t)`` takes ``x: (batch, *dims)`` and continuous ``t: (batch,)``; extra inputs
(a class label, a low-resolution image for SR3/Palette-style conditioning) pass through:
``score_fn(x, t, y)`` calls ``model(x, t, y)``. Networks
trained on N discrete timesteps are wrapped by :func:`discrete_score_fn` (and a diffusers
``UNet2DModel`` with its scheduler by :func:`from_diffusers`), with timestep ``n`` (0-based) at
``t = (n + 1) / N`` on ``VPSDE.from_betas(betas)``, where ``alpha(t)^2 = alphas_cumprod[n]`` exactly.
"""

from __future__ import annotations

import torch

from . import _checks
from .sdes import SDE, bcast

PREDICTIONS = ("score", "eps", "x0", "v")
_DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def _to_score(out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction: str):
    """The score from a network output; ``alpha``, ``sigma`` broadcast against ``x``."""
    if prediction == "score":
        return out
    if prediction == "x0":
        return (alpha * out - x) / sigma**2
    eps = out if prediction == "eps" else (sigma * x + alpha * out) / (alpha**2 + sigma**2)
    return -eps / sigma


def _check(model, sde, prediction):
    _checks.callable_("model", model)
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdediff SDE, got {type(sde).__name__}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def as_score_fn(model, sde: SDE, prediction: str = "eps"):
    """Turn ``model(x, t)`` predicting ``prediction`` (one of ``PREDICTIONS``) into a ``score_fn``."""
    _check(model, sde, prediction)
    if prediction == "score":
        return model

    def score_fn(x: torch.Tensor, t: torch.Tensor, *cond, **cond_kw) -> torch.Tensor:
        alpha, sigma = (bcast(c, x) for c in sde._alpha_sigma(t))
        return _to_score(model(x, t, *cond, **cond_kw), x, alpha, sigma, prediction)

    return score_fn


def score_from_eps(eps_model, sde: SDE):
    """``score = -eps_model(x, t) / sigma(t)``."""
    return as_score_fn(eps_model, sde, "eps")


def score_from_x0(x0_model, sde: SDE):
    """``score = (alpha(t) x0_model(x, t) - x) / sigma(t)^2``."""
    return as_score_fn(x0_model, sde, "x0")


def score_from_v(v_model, sde: SDE):
    """``score`` from ``v = alpha eps - sigma x0`` predictions."""
    return as_score_fn(v_model, sde, "v")


def discrete_score_fn(model, sde: SDE, prediction: str = "eps", *, integer_timesteps: bool = True):
    """Turn ``model(x, n)``, trained on the N timesteps of ``sde = VPSDE.from_betas(betas)``, into a ``score_fn``.

    Time ``t`` maps to ``n = N t - 1`` (so ``t = (n + 1) / N``, where ``alpha(t)^2`` equals the
    model's ``alphas_cumprod[n]``; score_sde's ``n = (N - 1) t`` agrees at ``t = 1`` only). With
    ``integer_timesteps`` (default) ``n`` is rounded to the nearest of ``0 .. N-1``, passed as a
    long tensor ``(batch,)``, and the output is converted with that timestep's ``alpha, sigma``;
    otherwise ``n`` is passed as a float (for networks with continuous time embeddings).
    """
    _check(model, sde, prediction)
    N = sde.discrete_steps
    if N is None:
        raise TypeError("sde must be a VPSDE with discrete betas: build it with VPSDE.from_betas(betas) "
                        "or VPSDE.from_alphas_cumprod(alphas_cumprod)")

    def score_fn(x: torch.Tensor, t: torch.Tensor, *cond, **cond_kw) -> torch.Tensor:
        n = t * N - 1.0
        if integer_timesteps:
            n = torch.round(n).clamp(0, N - 1)
            t = (n + 1.0) / N
            n = n.long()
        alpha, sigma = (bcast(c, x) for c in sde._alpha_sigma(t))
        return _to_score(model(x, n, *cond, **cond_kw), x, alpha, sigma, prediction)

    return score_fn


def from_diffusers(unet, scheduler):
    """``(score_fn, sde)`` for a diffusers ``UNet2DModel`` (or any ``unet(x, n).sample``) and its scheduler.

    ``sde = VPSDE.from_alphas_cumprod(scheduler.alphas_cumprod)`` and the prediction type comes
    from ``scheduler.config.prediction_type``; a learned-variance output (``2C`` channels) keeps
    its first ``C``. Timesteps are integers, as diffusers' schedulers use them. Extra arguments of
    ``score_fn(x, t, ...)`` go to the unet (e.g. ``class_labels=y``).
    """
    from .sdes import VPSDE

    config = getattr(scheduler, "config", None)
    if config is None or not hasattr(scheduler, "alphas_cumprod"):
        raise TypeError(f"scheduler must be a diffusers scheduler with alphas_cumprod, got {type(scheduler).__name__}")
    prediction = _DIFFUSERS_PREDICTIONS.get(config.prediction_type)
    if prediction is None:
        raise ValueError(f"prediction_type {config.prediction_type!r} is not one of {tuple(_DIFFUSERS_PREDICTIONS)}")
    sde = VPSDE.from_alphas_cumprod(scheduler.alphas_cumprod.detach().to(torch.float64))

    def model(x, n, *cond, **cond_kw):
        out = unet(x, n, *cond, **cond_kw).sample
        return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out

    return discrete_score_fn(model, sde, prediction), sde
