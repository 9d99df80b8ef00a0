"""Adapters from network parameterizations to the ``score_fn(x, t)`` contract.

With ``x_t = alpha x_0 + sigma eps``:

* eps-prediction:  ``score = -eps / sigma``
* x0-prediction:   ``score = (alpha x0 - x) / sigma^2``
* v-prediction (``v = alpha eps - sigma x0``, Salimans & Ho):
  ``eps = (sigma x + alpha v) / (alpha^2 + sigma^2)``, then as eps.

Each ``model(x, t)`` takes ``x: (batch, *dims)`` and continuous ``t: (batch,)``.
"""

from __future__ import annotations

import torch

from . import _checks
from .sdes import SDE, bcast

PREDICTIONS = ("score", "eps", "x0", "v")


def as_score_fn(model, sde: SDE, prediction: str = "eps"):
    """Turn ``model(x, t)`` predicting ``prediction`` (one of ``PREDICTIONS``) into a ``score_fn``."""
    _checks.callable_("model", model)
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdediff SDE, got {type(sde).__name__}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if prediction == "score":
        return model

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (bcast(c, x) for c in sde._alpha_sigma(t))
        out = model(x, t)
        if prediction == "x0":
            return (alpha * out - x) / sigma**2
        eps = out if prediction == "eps" else (sigma * x + alpha * out) / (alpha**2 + sigma**2)
        return -eps / sigma

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
