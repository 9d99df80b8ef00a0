"""Training objectives: denoising score matching over continuous time, sliced score matching, and
improved DDPM's importance sampler of discrete timesteps (the bound itself is in :mod:`sdediff.vlb`).

:func:`dsm_loss` draws ``t`` and ``eps``, forms ``x_t = alpha(t) x_0 + sigma(t) eps``, turns the
network output into a score ``s`` (any parameterization of :data:`~sdediff.models.PREDICTIONS`)
and returns the per-sample

    lambda(t) ||s(x_t, t) - grad log p(x_t | x_0)||^2,   grad log p(x_t | x_0) = -eps / sigma(t),

computed as ``lambda(t) / sigma^2 * ||sigma s + eps||^2`` (one code path for every
parameterization; for eps-prediction ``sigma s + eps = eps - out``, the DDPM residual).

:func:`ssm_loss` is sliced score matching (Song, Garg, Shi & Ermon 2019) for a data-space score
model ``s(x)``: an unbiased estimate of Hyvarinen's ``E[tr(ds/dx) + 1/2 ||s||^2]``.
"""

from __future__ import annotations

from collections import deque

import torch

from . import _checks
from .models import PREDICTIONS, _to_score
from .sdes import SDE, bcast, check_sde

WEIGHTINGS = ("simple", "sigma2", "likelihood")
PROBES = ("rademacher", "gaussian")


def _flat_sum(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def dsm_loss(model, sde: SDE, x0: torch.Tensor, *, parameterization: str = "score", weighting: str = "simple",
             importance_sampling: bool = False, t_min: float = 1e-5, generator=None) -> torch.Tensor:
    """Denoising score matching loss per sample, shape ``(batch,)``.

    ``model(x_t, t)`` (``x_t: (batch, *dims)``, ``t: (batch,)``) predicts ``parameterization``
    (``"score"``, ``"eps"``, ``"x0"`` or ``"v"``). With ``r = sigma(t) s(x_t, t) + eps`` (so that
    ``||s - grad log p(x_t|x_0)||^2 = ||r||^2 / sigma^2``), ``t ~ U[t_min, T]`` and ``d = dims``:

    * ``"simple"``: ``mean_d r^2``, DDPM's ``||eps_pred - eps||^2`` averaged over dimensions
      (its ``mean_flat``); ``lambda = sigma^2 / d``.
    * ``"sigma2"``: ``sum_d r^2``, score_sde's ``lambda = sigma^2`` with ``reduce_mean=False``;
      the same as ``"simple"`` times ``d``.
    * ``"likelihood"``: ``(T - t_min) / 2 * g(t)^2 / sigma^2 * sum_d r^2`` (``lambda = g^2``,
      Song, Durkan, Murray & Ermon 2021). Its expectation is exactly
      ``1/2 int_{t_min}^T E g^2 ||s - grad log p(x_t|x_0)||^2 dt``, the score-dependent term of
      the bound ``-E log p^model_{t_min}(x) <= E[-log p_T(x_T)] + that integral + const`` (``x``
      drawn from the data diffused to ``t_min``; ``const`` free of ``s``).

    ``importance_sampling=True`` (``"likelihood"`` only; other weightings raise ``ValueError``)
    draws the log-SNR ``l = log(alpha^2/sigma^2)`` uniformly on ``[l(T), l(t_min)]`` and sets
    ``t = t(l)``. Because every linear SDE has ``g^2 / sigma^2 = -dl/dt``, this samples
    ``q(t) = g^2 / (sigma^2 (l(t_min) - l(T)))``, and the unbiased reweighted loss is
    ``(l(t_min) - l(T)) / 2 * sum_d r^2`` (same expectation as the uniform-``t`` one, and free
    of the ``1/t`` tail that uniform ``t`` gives near ``t = 0``).

    The weighting is of the score error, whatever the parameterization: with ``"x0"`` or ``"v"``,
    ``"simple"`` is the eps-space error, not the x0 or v mean-squared error (for x0 it is SNR times it).

    Draws, in order, from ``generator`` on ``x0``'s device and dtype: ``u = rand(batch)``
    (``t = t_min + (T - t_min) u``, or ``l = l(t_min) - (l(t_min) - l(T)) u``), then
    ``eps = randn(x0.shape)``.
    """
    _checks.callable_("model", model)
    check_sde(sde)
    x0 = _checks.batched("x0", x0)
    if parameterization not in PREDICTIONS:
        raise ValueError(f"parameterization must be one of {PREDICTIONS}, got {parameterization!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if _flag("importance_sampling", importance_sampling) and weighting != "likelihood":
        # The log-SNR proposal is matched to g^2 only; for the sigma^2 weightings it would just
        # add variance, so we refuse rather than silently change the estimator.
        raise ValueError(f"importance_sampling=True requires weighting='likelihood', got weighting={weighting!r}")
    t_min = _checks.real("t_min", t_min, low=0.0, high=sde.T, low_open=True, high_open=True)

    batch, like = x0.shape[0], dict(dtype=x0.dtype, device=x0.device)
    u = torch.rand(batch, generator=generator, **like)
    if importance_sampling:
        ends = torch.tensor([t_min, sde.T], **like)
        lam_hi, lam_lo = sde._log_snr(ends).unbind()
        span = lam_hi - lam_lo
        # clamp: the inverse may land a rounding error outside [t_min, T]
        t = sde._t_from_log_snr(lam_hi - span * u).clamp(t_min, sde.T)
    else:
        t = t_min + (sde.T - t_min) * u
    eps = torch.randn(x0.shape, generator=generator, **like)

    alpha_t, sigma_t = sde._alpha_sigma(t)
    alpha, sigma = bcast(alpha_t, x0), bcast(sigma_t, x0)
    x_t = alpha * x0 + sigma * eps
    out = model(x_t, t)
    if not isinstance(out, torch.Tensor) or out.shape != x0.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model must return a tensor of the shape of x0 {tuple(x0.shape)}, got {got}")
    score = _to_score(out, x_t, alpha, sigma, parameterization)
    # sigma-scaled residual: bounded as sigma -> 0, unlike score - (-eps / sigma) itself.
    sq = (sigma * score + eps).pow(2)

    if weighting == "simple":
        return sq.reshape(batch, -1).mean(1)
    if weighting == "sigma2":
        return _flat_sum(sq)
    if importance_sampling:
        return 0.5 * span * _flat_sum(sq)
    return 0.5 * (sde.T - t_min) * sde._g2(t) / sigma_t**2 * _flat_sum(sq)


def ssm_loss(score_model, x: torch.Tensor, *, projections: int = 1, noise: str = "rademacher",
             variance_reduction: bool = False, generator=None) -> torch.Tensor:
    """Sliced score matching loss per sample, shape ``(batch,)``.

    ``score_model(x) -> (batch, *dims)`` is a data-space score (for a time-conditional network
    pass ``lambda x: net(x, t)``); it must treat samples independently (no batch statistics),
    since one backward pass gives every sample's Jacobian-vector product. With probes ``v``
    (``E[v v^T] = I``), averaged over ``projections`` probes per sample:

    * ``v^T (ds/dx) v + 1/2 (v^T s)^2`` (SSM), or
    * ``v^T (ds/dx) v + 1/2 ||s||^2`` with ``variance_reduction=True`` (SSM-VR),

    each an unbiased estimate of Hyvarinen's ``tr(ds/dx) + 1/2 ||s||^2``, whose expectation over
    the data is minimized by the true score (up to an ``s``-free constant). The Jacobian term is
    built with ``create_graph=True``, so the loss backpropagates to the model's parameters.
    ``x`` is treated as data (detached). Probes are drawn in one call, shape
    ``(projections, *x.shape)``, from ``generator`` on ``x``'s device.
    """
    _checks.callable_("score_model", score_model)
    x = _checks.batched("x", x)
    projections = _checks.positive_int("projections", projections)
    if noise not in PROBES:
        raise ValueError(f"noise must be one of {PROBES}, got {noise!r}")
    variance_reduction = _flag("variance_reduction", variance_reduction)

    shape = (projections,) + tuple(x.shape)
    if noise == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2.0 - 1.0
    else:
        v = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)

    x = x.detach().requires_grad_(True)
    # enable_grad: the Jacobian term needs a graph even if the caller evaluates under no_grad.
    with torch.enable_grad():
        s = score_model(x)
        if not isinstance(s, torch.Tensor) or s.shape != x.shape:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"score_model must return a tensor of the shape of x {tuple(x.shape)}, got {got}")
        total = torch.zeros(x.shape[0], dtype=s.dtype, device=x.device)
        for k in range(projections):
            # grad of <v, s> w.r.t. x is (ds/dx)^T v per sample; dotted with v gives v^T (ds/dx) v.
            jtv = None
            if s.requires_grad:  # a score that ignores x (e.g. a constant) has a zero Jacobian
                (jtv,) = torch.autograd.grad(s, x, grad_outputs=v[k], create_graph=True, allow_unused=True)
            vjv = _flat_sum(v[k] * jtv) if jtv is not None else torch.zeros_like(total)
            half_sq = 0.5 * _flat_sum(s.pow(2)) if variance_reduction else 0.5 * _flat_sum(v[k] * s).pow(2)
            total = total + vjv + half_sq
    return total / projections


class LossHistorySampler:
    """iDDPM's importance sampler of timesteps: ``p_n ∝ sqrt(E[L_n^2])`` over the last ``history`` losses.

    Uniform until every timestep holds ``history`` losses; then ``p = (1 - u) p_n + u / N`` with
    ``u = uniform_prob``. :meth:`sample` returns timesteps and weights ``1 / (N p_n)``, so
    ``mean(weights * L)`` is an unbiased estimate of ``mean_n L_n``.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps = _checks.positive_int("num_timesteps", num_timesteps)
        self.history = _checks.positive_int("history", history)
        self.uniform_prob = _checks.real("uniform_prob", uniform_prob, low=0.0, high=1.0)
        self._losses = [deque(maxlen=self.history) for _ in range(self.num_timesteps)]
        self._full = 0  # timesteps holding `history` losses

    @property
    def warmed_up(self) -> bool:
        return self._full == self.num_timesteps

    def probabilities(self) -> torch.Tensor:
        """``p_n``, float64 ``(N,)``."""
        N = self.num_timesteps
        if not self.warmed_up:
            return torch.full((N,), 1.0 / N, dtype=torch.float64)
        w = torch.tensor([list(d) for d in self._losses], dtype=torch.float64).pow(2).mean(1).sqrt()
        w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / N)
        return (1.0 - self.uniform_prob) * w + self.uniform_prob / N

    def sample(self, batch: int, generator=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps (long ``(batch,)``) and weights ``1 / (N p_n)`` (float64 ``(batch,)``)."""
        batch = _checks.positive_int("batch", batch)
        where = generator.device if generator is not None else torch.device("cpu")  # draw where the generator is
        p = self.probabilities().to(where)
        n = torch.multinomial(p, batch, replacement=True, generator=generator)
        return n.to(device), (1.0 / (self.num_timesteps * p[n])).to(device)

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record ``losses[i]`` (detached) for timestep ``timesteps[i]``; keeps the last ``history`` per timestep."""
        if not isinstance(timesteps, torch.Tensor) or timesteps.dtype != torch.long or timesteps.dim() != 1:
            raise TypeError("timesteps must be a 1-D long tensor")
        losses = _checks.float_tensor("losses", losses).detach().to("cpu", torch.float64)
        if losses.shape != timesteps.shape or not bool(torch.isfinite(losses).all()):
            raise ValueError(f"losses must be finite, of the shape of timesteps {tuple(timesteps.shape)}")
        if bool(((timesteps < 0) | (timesteps >= self.num_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}]")
        for n, loss in zip(timesteps.tolist(), losses.tolist()):  # in order: a repeated n keeps its latest losses
            d = self._losses[n]
            self._full += len(d) == self.history - 1
            d.append(loss)
