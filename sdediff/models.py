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
from .sdes import SDE, bcast, check_sde

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
    check_sde(sde)
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def as_score_fn(model, sde: SDE, prediction: str = "eps"):
    """Turn ``model(x, t)`` predicting ``prediction`` (one of ``PREDICTIONS``) into a ``score_fn``.

    For a half-precision state the samplers pass ``t`` in float32: a half-precision ``model``
    casts it to its own dtype (as :class:`sdediff.nets.TimeMLP` does).
    """
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
    otherwise ``n`` is passed as a float (for networks with continuous time embeddings), in float32
    for a half-precision state.
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
    from ``scheduler.config.prediction_type``. Timesteps are integers, as diffusers' schedulers use
    them. Extra arguments of ``score_fn(x, t, ...)`` go to the unet (e.g. ``class_labels=y``).
    With ``variance_type="learned_range"`` (improved DDPM; ``2C`` output channels) the score_fn is
    a :class:`LearnedVariance`, which :func:`sdediff.sample_ddpm` samples with its learned
    variance; any other ``2C``-channel output keeps its first ``C``.
    """
    from .sdes import VPSDE

    config = getattr(scheduler, "config", None)
    if config is None or not hasattr(scheduler, "alphas_cumprod"):
        raise TypeError(f"scheduler must be a diffusers scheduler with alphas_cumprod, got {type(scheduler).__name__}")
    prediction = _DIFFUSERS_PREDICTIONS.get(config.prediction_type)
    if prediction is None:
        raise ValueError(f"prediction_type {config.prediction_type!r} is not one of {tuple(_DIFFUSERS_PREDICTIONS)}")
    sde = VPSDE.from_alphas_cumprod(scheduler.alphas_cumprod.detach().to(torch.float64))
    if getattr(config, "variance_type", None) == "learned_range":
        return LearnedVariance(lambda x, n, *cond, **cond_kw: unet(x, n, *cond, **cond_kw).sample, sde, prediction), sde

    def model(x, n, *cond, **cond_kw):
        out = unet(x, n, *cond, **cond_kw).sample
        return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out

    return discrete_score_fn(model, sde, prediction), sde


class LearnedVariance:
    """A network with improved DDPM's learned variance (Nichol & Dhariwal 2021), as a ``score_fn``.

    ``model(x, n) -> (batch, 2C, ...)``, trained on the ``N`` timesteps of ``sde`` (see
    :func:`discrete_score_fn`), gives the ``prediction`` in its first ``C`` channels and
    ``v in [-1, 1]`` in the last ``C``. Called as ``score_fn(x, t)`` it returns the score of the
    first half; :meth:`interpolation` gives ``frac = (v + 1) / 2`` at the same ``x`` from the same
    network call, and the DDPM sampler steps with the variance
    ``exp(frac log beta + (1 - frac) log beta~)`` (``sample_ddpm`` does this when handed one).
    """

    def __init__(self, model, sde: SDE, prediction: str = "eps", *, integer_timesteps: bool = True):
        _checks.callable_("model", model)
        self._x = self._v = None

        def first_half(x, n, *cond, **cond_kw):
            out = model(x, n, *cond, **cond_kw)
            C = x.shape[1] if x.dim() > 1 else 0
            if not isinstance(out, torch.Tensor) or x.dim() < 2 or out.shape != (x.shape[0], 2 * C) + x.shape[2:]:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"a learned-variance model must return (batch, 2C, ...) = "
                                 f"{(x.shape[0], 2 * C) + tuple(x.shape[2:])} for x {tuple(x.shape)}, got {got}")
            self._x, self._v = x, out[:, C:]
            return out[:, :C]

        self._score_fn = discrete_score_fn(first_half, sde, prediction, integer_timesteps=integer_timesteps)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *cond, **cond_kw) -> torch.Tensor:
        return self._score_fn(x, t, *cond, **cond_kw)

    def interpolation(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``frac = (v + 1) / 2`` of the network at ``(x, t)``, shape of ``x`` (reuses the last call at this ``x``)."""
        if self._x is not x:
            self(x, t.expand(x.shape[0]) if t.dim() == 0 else t)
        return (self._v + 1.0) / 2.0
