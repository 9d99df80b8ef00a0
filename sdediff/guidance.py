"""Conditioning as a transformation of the score.

By Bayes' rule ``grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x)``, so

* classifier guidance (Dhariwal & Nichol 2021): ``s(x, t) + w grad_x log p_t(y | x)``;
* classifier-free guidance (Ho & Salimans 2022): ``(1 + w) s(x, t, y) - w s(x, t)``
  ``= s(x, t, y) + w [s(x, t, y) - s(x, t)]``, the same with an implicit classifier.

``w = 1`` (classifier) and ``w = 0`` (classifier-free) sample ``p(x | y)``. Larger scales trade
diversity for fidelity: at ``t = 0`` the guided score is that of ``p(x) p(y | x)^gamma``
(``gamma = w`` for classifier guidance, ``1 + w`` for CFG), but at ``t > 0`` it is not the score
of that target diffused, so the samples overshoot it (docs/guidance.md measures by how much).
diffusers' ``guidance_scale`` is ``1 + w``. Each transform returns an ordinary ``score_fn(x, t)``, so every
sampler, solver and the likelihood code take it unchanged.
"""

from __future__ import annotations

import torch

from . import _checks
from .sdes import bcast


def _scale(scale):
    """A finite float, or a float tensor (0-d or ``(batch,)``) for a per-sample scale."""
    if isinstance(scale, torch.Tensor):
        scale = _checks.float_tensor("scale", scale)
        if scale.dim() > 1 or not bool(torch.isfinite(scale).all()):
            raise ValueError(f"scale must be finite, a float or a tensor of shape (batch,), got shape {tuple(scale.shape)}")
        return scale.detach()
    return _checks.real("scale", scale, low=-float("inf"))


def _per_sample(w, x: torch.Tensor):
    if isinstance(w, torch.Tensor):
        if w.dim() == 1 and w.shape[0] != x.shape[0]:
            raise ValueError(f"scale has {w.shape[0]} entries but x has batch size {x.shape[0]}")
        return bcast(w.to(device=x.device, dtype=x.dtype), x)
    return w


def classifier_guidance(score_fn, classifier_log_prob, y, scale=1.0):
    """``score_fn(x, t) + w grad_x log p_t(y | x)`` with ``w = scale``.

    ``classifier_log_prob(x, t, y)``: a noisy-data classifier returning ``log p_t(y | x)`` per
    sample, ``(batch,)``, or logits ``(batch, classes)`` (then ``y: (batch,)`` holds class indices
    and ``log_softmax`` is taken). ``scale``: a float or a tensor ``(batch,)``. The gradient is
    taken with ``torch.func.grad``, per sample (each sample's log-probability depends on its own
    ``x`` only), so it works under ``torch.no_grad`` in the sampling loops and composes with the
    likelihood's ``vjp``/``vmap`` divergence.
    """
    _checks.callable_("score_fn", score_fn)
    _checks.callable_("classifier_log_prob", classifier_log_prob)
    w = _scale(scale)

    def total_log_prob(x, t):
        out = classifier_log_prob(x, t, y)
        if not isinstance(out, torch.Tensor) or out.dim() not in (1, 2) or out.shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"classifier_log_prob must return (batch,) log-probabilities or (batch, classes) logits, "
                             f"got {got} for x of batch size {x.shape[0]}")
        if out.dim() == 2:
            labels = torch.as_tensor(y, device=out.device).reshape(-1, 1).expand(out.shape[0], 1)
            out = torch.log_softmax(out, -1).gather(1, labels).squeeze(1)
        return out.sum()

    grad_log_prob = torch.func.grad(total_log_prob)

    def guided_score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return score_fn(x, t) + _per_sample(w, x) * grad_log_prob(x, t)

    return guided_score_fn


def classifier_free_guidance(cond_score_fn, uncond_score_fn=None, scale=1.0, *, y=None, null=None,
                             batched: bool = True):
    """``(1 + w) s(x, t | y) - w s(x, t)`` with ``w = scale`` (a float or a tensor ``(batch,)``).

    Two forms:

    * ``cond_score_fn(x, t)`` and ``uncond_score_fn(x, t)``: two score functions (two calls);
    * one network trained with condition dropout: ``cond_score_fn(x, t, y)`` with ``y`` and the
      ``null`` condition (``uncond_score_fn=None``). With ``batched`` (default) both branches are
      one call on ``[x; x]`` with conditions ``[y; null]``; otherwise two calls.

    ``y``: ``(batch, ...)`` or ``(1, ...)`` (one condition for all samples); ``null`` broadcasts
    against one condition. Network outputs of any parameterization work through the adapters:
    ``as_score_fn(net, sde, "eps")`` passes ``y`` on to ``net(x, t, y)``, and since each adapter
    is affine in the output with weights summing to one, guiding the score equals guiding ``eps``,
    ``x0`` or ``v``.
    """
    _checks.callable_("cond_score_fn", cond_score_fn)
    w = _scale(scale)
    if uncond_score_fn is not None:
        _checks.callable_("uncond_score_fn", uncond_score_fn)
        if y is not None or null is not None:
            raise ValueError("give either uncond_score_fn or (y, null) for one conditional network, not both")

        def guided_score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            w_x = _per_sample(w, x)
            return (1.0 + w_x) * cond_score_fn(x, t) - w_x * uncond_score_fn(x, t)

        return guided_score_fn

    if y is None or null is None:
        raise ValueError("without uncond_score_fn, give y and null: cond_score_fn(x, t, y) is one conditional network")
    y, null = torch.as_tensor(y), torch.as_tensor(null)
    if y.dim() == 0:
        y = y.reshape(1)

    def conditions(x):
        y_x = y.to(x.device)
        if y_x.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"y has {y_x.shape[0]} conditions but x has batch size {x.shape[0]}; give 1 or {x.shape[0]}")
        y_x = y_x.expand((x.shape[0],) + y_x.shape[1:])
        return y_x, null.to(device=x.device, dtype=y_x.dtype).expand_as(y_x)

    def guided_score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y_x, null_x = conditions(x)
        if batched:
            both = cond_score_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y_x, null_x]))
            cond, uncond = both.chunk(2)
        else:
            cond, uncond = cond_score_fn(x, t, y_x), cond_score_fn(x, t, null_x)
        w_x = _per_sample(w, x)
        return (1.0 + w_x) * cond - w_x * uncond

    return guided_score_fn


def drop_condition(y: torch.Tensor, null, p: float, *, generator=None) -> torch.Tensor:
    """``y`` with each sample's condition replaced by ``null`` with probability ``p``.

    Training with it (Ho & Salimans use ``p = 0.1``-``0.2``) makes one network learn both the
    conditional score ``s(x, t, y)`` and the unconditional ``s(x, t, null)`` that
    :func:`classifier_free_guidance` combines. ``y: (batch, ...)``; ``null`` broadcasts against
    one condition; draws come from ``generator`` on ``y``'s device.
    """
    if not isinstance(y, torch.Tensor) or y.dim() < 1:
        raise TypeError(f"y must be a tensor of conditions (batch, ...), got {type(y).__name__} {getattr(y, 'shape', '')}")
    p = _checks.real("p", p, low=0.0, high=1.0)
    drop = torch.rand(y.shape[0], generator=generator, device=y.device) < p
    null = torch.as_tensor(null, device=y.device, dtype=y.dtype)
    return torch.where(bcast(drop, y), null, y)
