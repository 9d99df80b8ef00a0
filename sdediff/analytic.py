"""An exact test bed: Gaussian mixtures stay Gaussian mixtures under every linear forward SDE.

If ``x_0 ~ sum_k w_k N(mu_k, diag(s_k^2))`` and ``x_t = alpha(t) x_0 + sigma(t) eps``, then

    p_t(x) = sum_k w_k N(x; alpha mu_k, diag(alpha^2 s_k^2 + sigma^2)),
    grad log p_t(x) = sum_k r_k(x) (alpha mu_k - x) / (alpha^2 s_k^2 + sigma^2),

with ``r_k(x)`` the posterior weight of component ``k``. These give exact log-densities and scores
at every ``t``: the ground truth of sdediff's tests, examples and benchmarks.

Components may carry class labels ``y_k``. Then the noisy classifier
``p_t(y | x) = sum_{k: y_k = y} w_k N_k(x) / p_t(x)`` and the class-conditional score (the same
sum restricted to class ``y``) are exact too, and so is inpainting's target: given known
coordinates, the unknown ones follow a mixture with weights ``∝ w_k N(known; mu_k, s_k)``.
"""

from __future__ import annotations

import math

import torch

from . import _checks
from ._tensors import moved
from .sdes import SDE, check_sde


def _one_time(t: torch.Tensor) -> torch.Tensor:
    """``t[:1]`` when ``t: (batch,)`` is one time expanded over the batch (stride 0, as the sampling
    loops pass it), else ``t``: the per-component variances then need no per-sample copies.

    Not when ``t`` requires grad (autograd or a ``torch.func`` transform): each sample's output
    must then depend on its own entry of ``t``, or the derivatives in ``t`` would all land on the first.
    """
    if t.dim() == 1 and t.shape[0] > 1 and t.stride(0) == 0 and not t.requires_grad:
        return t[:1]
    return t


class GaussianMixture:
    """``sum_k w_k N(mu_k, diag(s_k^2))`` on ``event_shape`` (vectors or any tensor shape).

    ``weights: (K,)`` (normalized here), ``means: (K, *event_shape)``, ``stds``: ``(K, *event_shape)``,
    ``(K,)`` (isotropic per component) or a float; ``labels``: optional class labels ``(K,)``
    (integers from 0). Computations run in the dtype and device of the query; parameters are
    stored in float64 (and copied per device once: treat them as read-only).
    """

    def __init__(self, weights, means, stds, labels=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if means.dim() < 2:
            raise ValueError(f"means must have shape (K, *event_shape), got {tuple(means.shape)}")
        K = means.shape[0]
        if weights.shape != (K,) or not bool((weights > 0).all()):
            raise ValueError(f"weights must be {K} positive numbers, got shape {tuple(weights.shape)}")
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.dim() == 1 and stds.shape[0] == K:
            stds = stds.reshape((K,) + (1,) * (means.dim() - 1))
        try:
            stds = torch.broadcast_to(stds, means.shape).clone()
        except RuntimeError:
            raise ValueError(f"stds of shape {tuple(stds.shape)} do not match means {tuple(means.shape)}") from None
        if not bool((stds > 0).all()):
            raise ValueError("stds must be positive")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (K,) or labels.is_floating_point() or labels.is_complex() or bool((labels < 0).any()):
                raise ValueError(f"labels must be {K} non-negative integers, got {labels}")
            labels = labels.long()
        self.labels = labels
        self.weights = weights / weights.sum()
        self.means = means
        self.stds = stds
        self.event_shape = tuple(means.shape[1:])
        self.dim = int(means[0].numel())
        self._on_device: dict = {}
        self._labels_on_device: dict = {}

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def _params(self, like: torch.Tensor):
        """``(log w (K,), mu (K, d), s (K, d))`` on ``like``'s device and dtype."""
        K = self.num_components
        return moved(self._on_device, like, (self.weights.log(), self.means.reshape(K, -1), self.stds.reshape(K, -1)))

    def sample(self, n: int, *, generator=None, dtype=torch.float64, device=None, return_components: bool = False):
        """``n`` exact draws ``(n, *event_shape)`` (and the index of each one's component ``(n,)`` if asked).

        A draw's class label is ``labels[component]``.
        """
        n = _checks.positive_int("n", n)
        # Draw on the generator's device (any device works then), in float64, then move.
        where = generator.device if generator is not None else torch.device("cpu")
        components = torch.multinomial(self.weights.to(where), n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=torch.float64, device=where)
        K = self.num_components
        x = self.means.reshape(K, -1).to(where)[components] + self.stds.reshape(K, -1).to(where)[components] * z
        x = x.reshape((n,) + self.event_shape).to(dtype=dtype, device=device)
        return (x, components.to(x.device)) if return_components else x

    def _component_terms(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """Per-component log-densities ``(batch, K)`` and ``(alpha mu_k - x) / var_k`` ``(batch, K, d)``.

        ``alpha``, ``sigma``: 0-d, ``(1,)`` (one time for the batch: the variances ``(1, K, d)`` are
        computed once) or ``(batch,)``.
        """
        log_w, mu, s = self._params(x)
        xf = x.reshape(x.shape[0], 1, -1)
        a = alpha.reshape(-1, 1, 1)
        var = a**2 * s**2 + sigma.reshape(-1, 1, 1) ** 2
        diff = a * mu - xf
        pull = diff / var
        log_comp = log_w - 0.5 * ((diff * pull).sum(-1) + torch.log(2.0 * math.pi * var).sum(-1))
        return log_comp, pull

    def _coefficients(self, sde: SDE | None, x: torch.Tensor, t):
        if sde is None:
            one = torch.ones((), dtype=x.dtype, device=x.device)
            return one, torch.zeros_like(one)
        return sde._alpha_sigma(_one_time(sde._time(t, x)))

    def _check_x(self, x):
        x = _checks.batched("x", x)
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"x must have shape (batch, *{self.event_shape}), got {tuple(x.shape)}")
        return x

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log w_k + log N(x; mu_k, diag(s_k^2))`` for each component, shape ``(batch, K)``.

        ``component_log_prob(x).argmax(1)`` assigns each point to its most likely component.
        """
        x = self._check_x(x)
        log_comp, _ = self._component_terms(x, *self._coefficients(None, x, None))
        return log_comp

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p_0(x)``, shape ``(batch,)``."""
        return torch.logsumexp(self.component_log_prob(x), 1)

    def marginal_log_prob(self, sde: SDE, x: torch.Tensor, t) -> torch.Tensor:
        """``log p_t(x)`` under the forward ``sde``, shape ``(batch,)``."""
        x = self._check_x(x)
        log_comp, _ = self._component_terms(x, *self._coefficients(sde, x, t))
        return torch.logsumexp(log_comp, 1)

    def marginal_score(self, sde: SDE, x: torch.Tensor, t) -> torch.Tensor:
        """``grad_x log p_t(x)`` under the forward ``sde``, shape of ``x``."""
        x = self._check_x(x)
        return self._score(x, *self._coefficients(sde, x, t))

    def _score(self, x, alpha, sigma):
        log_comp, pull = self._component_terms(x, alpha, sigma)
        resp = torch.softmax(log_comp, 1).unsqueeze(-1)
        return (resp * pull).sum(1).reshape(x.shape)

    def score_fn(self, sde: SDE):
        """The exact ``score_fn(x, t)`` of the mixture diffused by ``sde`` (``t: (batch,)``, unvalidated)."""
        check_sde(sde)

        def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self._score(x, *sde._alpha_sigma(_one_time(t)))

        return score_fn

    def diffused(self, sde: SDE, t: float) -> "GaussianMixture":
        """The mixture ``p_t`` at one time ``t``: means ``alpha mu_k``, stds ``sqrt(alpha^2 s_k^2 + sigma^2)``."""
        alpha, sigma = (c.item() for c in sde.marginal(torch.tensor(float(t), dtype=torch.float64)))
        return GaussianMixture(self.weights, alpha * self.means, torch.sqrt(alpha**2 * self.stds**2 + sigma**2),
                               self.labels)

    # -- class labels ------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def _labels(self, like: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            raise ValueError("this mixture has no class labels: build it with labels=...")
        if like.device not in self._labels_on_device:  # integers: one copy per device serves every dtype
            self._labels_on_device[like.device] = self.labels.to(like.device)
        return self._labels_on_device[like.device]

    def _class_mask(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``(batch, K)``: True where component ``k`` carries sample ``i``'s label ``y_i`` (every ``k`` if ``y_i < 0``)."""
        y = torch.as_tensor(y, device=like.device).reshape(-1, 1)
        return (self._labels(like) == y) | (y < 0)

    def class_log_prob(self, sde: SDE | None, x: torch.Tensor, t=None) -> torch.Tensor:
        """``log p_t(y = c | x)`` for every class ``c``, shape ``(batch, num_classes)`` (``sde=None``: at t = 0)."""
        x = self._check_x(x)
        log_comp, _ = self._component_terms(x, *self._coefficients(sde, x, t))
        other = self._labels(x) != torch.arange(self.num_classes, device=x.device)[:, None]  # (C, K)
        return torch.logsumexp(log_comp.unsqueeze(1).masked_fill(other, -math.inf), -1) - torch.logsumexp(
            log_comp, 1, keepdim=True)

    def classifier(self, sde: SDE):
        """The exact noisy classifier ``classifier_log_prob(x, t, y) = log p_t(y | x)``, shape ``(batch,)``."""
        check_sde(sde)

        def classifier_log_prob(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            log_comp, _ = self._component_terms(x, *sde._alpha_sigma(_one_time(t)))
            in_class = log_comp.masked_fill(~self._class_mask(y, x), -math.inf)
            return torch.logsumexp(in_class, 1) - torch.logsumexp(log_comp, 1)

        return classifier_log_prob

    def conditional_score_fn(self, sde: SDE):
        """The exact class-conditional score ``score_fn(x, t, y) = grad_x log p_t(x | y)``, ``y: (batch,)``.

        A negative label is the null condition: it gives the unconditional score, as a network
        trained with condition dropout would (see :func:`sdediff.drop_condition`).
        """
        check_sde(sde)

        def score_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            log_comp, pull = self._component_terms(x, *sde._alpha_sigma(_one_time(t)))
            resp = torch.softmax(log_comp.masked_fill(~self._class_mask(y, x), -math.inf), 1).unsqueeze(-1)
            return (resp * pull).sum(1).reshape(x.shape)

        return score_fn

    def conditional(self, y: int) -> "GaussianMixture":
        """The mixture of class ``y``'s components, ``p_0(x | y)``."""
        if self.labels is None:
            raise ValueError("this mixture has no class labels: build it with labels=...")
        keep = self.labels == int(y)
        if not bool(keep.any()):
            raise ValueError(f"no component has label {y}; labels are {self.labels.tolist()}")
        return GaussianMixture(self.weights[keep], self.means[keep], self.stds[keep], self.labels[keep])

    def condition_on(self, mask, known) -> "GaussianMixture":
        """``p_0(x_unknown | x_known)``: a mixture on the flattened unknown coordinates.

        ``mask``: ``event_shape`` booleans, True where the coordinate is known; ``known``: values of
        ``event_shape`` (read where ``mask`` is True). Component ``k`` keeps its mean and std on the
        unknown coordinates and gets weight ``∝ w_k N(x_known; mu_k, diag(s_k^2))`` (diagonal
        components factorize).
        """
        K = self.num_components
        mask = torch.as_tensor(mask, dtype=torch.bool).reshape(-1)
        known = torch.as_tensor(known, dtype=torch.float64).reshape(-1)
        if mask.numel() != self.dim or known.numel() != self.dim or not bool(mask.any()) or bool(mask.all()):
            raise ValueError(f"mask and known must have {self.dim} entries, with some but not all coordinates known")
        mu, s = self.means.reshape(K, -1), self.stds.reshape(K, -1)
        z = (known[mask] - mu[:, mask]) / s[:, mask]
        log_w = self.weights.log() - (0.5 * z**2 + s[:, mask].log()).sum(1)
        return GaussianMixture(torch.softmax(log_w, 0), mu[:, ~mask], s[:, ~mask], self.labels)

    def mean(self) -> torch.Tensor:
        """Mixture mean, ``event_shape``."""
        return torch.einsum("k,k...->...", self.weights, self.means)

    def covariance(self) -> torch.Tensor:
        """Mixture covariance over the flattened event, ``(d, d)``."""
        K = self.num_components
        mu = self.means.reshape(K, -1)
        m = self.weights @ mu
        c = mu - m
        within = torch.diag(self.weights @ self.stds.reshape(K, -1) ** 2)
        return within + (self.weights[:, None] * c).T @ c

    def __repr__(self):
        return f"GaussianMixture(K={self.num_components}, event_shape={self.event_shape})"
