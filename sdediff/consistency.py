"""Consistency models (Song, Dhariwal, Chen & Sutskever 2023) on the EDM process (time = noise level).

On :class:`~sdediff.EDMSDE` (``x_t = x_0 + t eps``) the probability-flow ODE maps every ``x_t`` to one
point ``x_eps`` at the smallest time ``eps``; the consistency function is that map,
``f(x_t, t) = x_eps``, with the boundary condition ``f(x, eps) = x``. It is parameterized as

    f(x, t) = c_skip(t) x + c_out(t) F(x, t),
    c_skip = sigma_data^2 / ((t - eps)^2 + sigma_data^2),  c_out = sigma_data (t - eps) / sqrt(sigma_data^2 + t^2),

and trained on the boundaries ``eps = t_1 < ... < t_N = T`` of :func:`karras_boundaries` by making
``f`` agree at adjacent times of one trajectory: ``d(f(x_{t_{n+1}}, t_{n+1}), f_target(x_{t_n}, t_n))``
with ``x_{t_n}`` from a teacher ODE step (distillation) or from the same noise (training).
"""

from __future__ import annotations

import math

import torch

from . import _checks
from .integrate import Solution
from .reverse import ReverseProcess
from .sdes import EDMSDE, bcast
from .solvers.base import get_solver

DISTANCES = ("l2", "l1", "pseudo_huber")
WEIGHTINGS = ("uniform", "inverse_gap")


def c_skip(t: torch.Tensor, *, sigma_data: float = 0.5, eps: float = 0.002) -> torch.Tensor:
    """``sigma_data^2 / ((t - eps)^2 + sigma_data^2)``, shape of ``t``; exactly 1 at ``t = eps``."""
    return sigma_data**2 / ((t - eps) ** 2 + sigma_data**2)


def c_out(t: torch.Tensor, *, sigma_data: float = 0.5, eps: float = 0.002) -> torch.Tensor:
    """``sigma_data (t - eps) / sqrt(sigma_data^2 + t^2)``, shape of ``t``; exactly 0 at ``t = eps``."""
    return sigma_data * (t - eps) / torch.sqrt(sigma_data**2 + t**2)


class ConsistencyFunction(torch.nn.Module):
    """``f(x, t) = c_skip(t) x + c_out(t) network(x, t)``: ``x: (batch, *dims)``, ``t: (batch,)`` or 0-d.

    ``network`` is an ``nn.Module`` (its parameters are this module's, ready for :func:`ema_update`)
    or any callable ``(x, t) -> (batch, *dims)``. ``f(x, eps) = x`` holds exactly (``c_out(eps) = 0``).
    """

    def __init__(self, network, *, sigma_data: float = 0.5, eps: float = 0.002):
        super().__init__()
        self.network = _checks.callable_("network", network)
        self.sigma_data = _checks.real("sigma_data", sigma_data, low=0.0, low_open=True)
        self.eps = _checks.real("eps", eps, low=0.0, low_open=True)

    def c_skip(self, t: torch.Tensor) -> torch.Tensor:
        return c_skip(t, sigma_data=self.sigma_data, eps=self.eps)

    def c_out(self, t: torch.Tensor) -> torch.Tensor:
        return c_out(t, sigma_data=self.sigma_data, eps=self.eps)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        out = self.network(x, t)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"network must return a tensor of the shape of x {tuple(x.shape)}, got {got}")
        return bcast(self.c_skip(t), x) * x + bcast(self.c_out(t), x) * out

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data}, eps={self.eps}"


def karras_boundaries(N: int, eps: float = 0.002, T: float = 80.0, rho: float = 7.0, *,
                      dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The ``N`` increasing times ``t_i = (eps^(1/rho) + (i-1)/(N-1) (T^(1/rho) - eps^(1/rho)))^rho``, ``(N,)``.

    ``t_1 = eps`` and ``t_N = T`` exactly; computed in float64, then cast.
    """
    N = _checks.positive_int("N", N)
    if N < 2:
        raise ValueError(f"N must be an int >= 2, got {N}")
    eps = _checks.real("eps", eps, low=0.0, low_open=True)
    T = _checks.real("T", T, low=eps, low_open=True)
    rho = _checks.real("rho", rho, low=0.0, low_open=True)
    u = torch.linspace(0.0, 1.0, N, dtype=torch.float64)
    ts = (eps ** (1 / rho) + u * (T ** (1 / rho) - eps ** (1 / rho))) ** rho
    ts[0], ts[-1] = eps, T
    return ts.to(dtype=dtype, device=device)


def _distance(distance, a: torch.Tensor, b: torch.Tensor, huber_c) -> torch.Tensor:
    if callable(distance):
        return distance(a, b)
    diff = (a - b).reshape(a.shape[0], -1)
    if distance == "l2":
        return diff.pow(2).sum(1)
    if distance == "l1":
        return diff.abs().sum(1)
    c = 0.00054 * math.sqrt(diff.shape[1]) if huber_c is None else huber_c
    return torch.sqrt(diff.pow(2).sum(1) + c**2) - c


def _setup(f, f_target, x0, N, sde, distance, weighting, eps, rho, huber_c, generator):
    """Validate; draw ``n``, then ``z``; return ``(ts, i, z, sde, huber_c)``, ``t_n = ts[i]``, ``t_{n+1} = ts[i+1]``."""
    _checks.callable_("f", f)
    _checks.callable_("f_target", f_target)
    x0 = _checks.batched("x0", x0)
    sde = EDMSDE() if sde is None else sde
    if not isinstance(sde, EDMSDE):
        raise TypeError(f"sde must be an sdediff EDMSDE (time = noise level) or None, got {type(sde).__name__}")
    if not callable(distance) and distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES} or a callable (a, b) -> (batch,), got {distance!r}")
    if not callable(weighting) and weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS} or a callable (t_n, t_n1) -> (batch,), "
                         f"got {weighting!r}")
    if huber_c is not None:
        huber_c = _checks.real("huber_c", huber_c, low=0.0, low_open=True)
    eps = getattr(f, "eps", 0.002) if eps is None else eps
    eps = _checks.real("eps", eps, low=0.0, high=sde.T, low_open=True, high_open=True)
    ts = karras_boundaries(N, eps, sde.T, rho, dtype=x0.dtype, device=x0.device)
    i = torch.randint(0, ts.shape[0] - 1, (x0.shape[0],), generator=generator, device=x0.device)
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return ts, i, z, sde, huber_c


def _finish(f, f_target, x_hi, t_hi, x_lo, t_lo, distance, weighting, huber_c):
    """``lambda(t_n, t_{n+1}) d(f(x_hi, t_{n+1}), stopgrad f_target(x_lo, t_n))``, ``(batch,)``."""
    with torch.no_grad():
        target = f_target(x_lo, t_lo).detach()
    out = f(x_hi, t_hi)
    loss = _distance(distance, out, target, huber_c)
    if callable(weighting):
        return weighting(t_lo, t_hi) * loss
    return loss / (t_hi - t_lo) if weighting == "inverse_gap" else loss


def consistency_training_loss(f, f_target, x0: torch.Tensor, *, N: int, sde=None, distance="l2",
                              weighting="uniform", eps: float | None = None, rho: float = 7.0,
                              huber_c: float | None = None, generator=None) -> torch.Tensor:
    """Consistency training (CT) loss per sample, shape ``(batch,)``; no teacher.

    With ``t_1..t_N = karras_boundaries(N, eps, sde.T, rho)``, ``n ~ U{1..N-1}`` and ``z ~ N(0, I)``:

        lambda(t_n, t_{n+1}) d(f(x0 + t_{n+1} z, t_{n+1}), stopgrad f_target(x0 + t_n z, t_n)).

    ``f``, ``f_target``: callables ``(x, t) -> x`` with ``t: (batch,)`` (``f_target``: the EMA copy of ``f``,
    or ``f`` itself; evaluated under ``no_grad``). ``sde``: an :class:`~sdediff.EDMSDE` (default
    ``EDMSDE()``, ``T = 80``); ``eps`` defaults to ``f.eps`` (else 0.002). ``distance`` over the
    flattened dims: ``"l2"`` ``||a - b||^2`` (the paper's CT), ``"l1"`` ``||a - b||_1``,
    ``"pseudo_huber"`` ``sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(d)`` (improved CT, Song &
    Dhariwal 2023; ``huber_c`` overrides ``c``), or a callable ``(a, b) -> (batch,)``. ``weighting``:
    ``"uniform"`` (``lambda = 1``, the default, as the original paper), ``"inverse_gap"``
    (``lambda = 1 / (t_{n+1} - t_n)``, improved CT) or a callable ``(t_n, t_{n+1}) -> (batch,)``.
    Every smooth ``f`` has loss ``O((t_{n+1} - t_n)^2)`` under ``"l2"``: minimize it, do not read it as an error.
    Draws ``n`` (``randint``), then ``z``, from ``generator`` on ``x0``'s device.
    """
    ts, i, z, sde, huber_c = _setup(f, f_target, x0, N, sde, distance, weighting, eps, rho, huber_c, generator)
    t_lo, t_hi = ts[i], ts[i + 1]
    return _finish(f, f_target, x0 + bcast(t_hi, x0) * z, t_hi, x0 + bcast(t_lo, x0) * z, t_lo, distance,
                   weighting, huber_c)


def consistency_distillation_loss(f, f_target, teacher_score_fn, x0: torch.Tensor, *, N: int, sde=None,
                                  solver="heun", distance="l2", weighting="uniform", eps: float | None = None,
                                  rho: float = 7.0, huber_c: float | None = None, generator=None) -> torch.Tensor:
    """Consistency distillation (CD) loss per sample, shape ``(batch,)``.

    As :func:`consistency_training_loss`, but ``x_{t_n}`` is one step of ``solver`` on the teacher's
    probability-flow ODE ``dx/dt = -t teacher_score_fn(x, t)`` from ``x_{t_{n+1}} = x0 + t_{n+1} z``:

        lambda(t_n, t_{n+1}) d(f(x_{t_{n+1}}, t_{n+1}), stopgrad f_target(x̂_{t_n}, t_n)).

    ``solver``: a name or instance of a single-step ODE solver (``"euler"``, ``"heun"`` (default, as the
    paper), ``"midpoint"``, ``"rk4"``, ``"ddim"`` (= Euler here), ``"dpm_solver_2"``, ...); multistep and
    adaptive solvers are refused. Solvers step 0-d times, so the batch is stepped in groups of equal
    ``n`` (at most ``N - 1`` groups). The teacher runs under ``no_grad``.
    """
    _checks.callable_("teacher_score_fn", teacher_score_fn)
    step = get_solver(solver, "ode")
    if step.multistep or step.adaptive:
        raise ValueError(f"solver must be a single-step, fixed-step ODE solver (euler, heun, rk4, ddim, "
                         f"dpm_solver_2, ...), got {step.name!r}")
    ts, i, z, sde, huber_c = _setup(f, f_target, x0, N, sde, distance, weighting, eps, rho, huber_c, generator)
    term = ReverseProcess(sde, teacher_score_fn, 0.0).ode_term()
    step.check_term(term)
    t_lo, t_hi = ts[i], ts[i + 1]
    x_hi = x0 + bcast(t_hi, x0) * z
    x_lo = torch.empty_like(x_hi)
    with torch.no_grad():
        for k in torch.unique(i).tolist():
            group = i == k
            x_lo[group] = step.step(term, x_hi[group].detach(), ts[k + 1], ts[k])
    return _finish(f, f_target, x_hi, t_hi, x_lo, t_lo, distance, weighting, huber_c)


def sample_consistency(f, x, *, times=(80.0,), eps: float | None = None, return_trajectory: bool = False,
                       generator=None, dtype=None, device=None) -> Solution:
    """Multistep consistency sampling (Algorithm 1): ``x = f(x_T, T)``, then for each later ``tau``

        x_tau = x + sqrt(tau^2 - eps^2) z,   x = f(x_tau, tau).

    ``times``: ``T`` or a strictly decreasing sequence ``T = tau_0 > tau_1 > ... > eps`` (``eps``: default
    ``f.eps``, else 0.002). ``x``: the start ``x_T: (batch, *dims)``, or a shape, drawn then from
    ``N(0, T^2 I)`` (the EDM prior; the true marginal is the data plus ``N(0, T^2 I)``, a relative
    mismatch ``~ data std / T``). ``z`` is drawn from
    ``generator``. Returns a :class:`~sdediff.Solution` with ``ts = times``, ``nfe = len(times)`` calls of
    ``f`` and, if asked, ``xs``: the output of each call, ``(len(times), batch, *dims)``.
    """
    _checks.callable_("f", f)
    eps = _checks.real("eps", getattr(f, "eps", 0.002) if eps is None else eps, low=0.0, low_open=True)
    if isinstance(times, torch.Tensor):
        times = times.detach().cpu().reshape(-1).tolist()
    elif not isinstance(times, (list, tuple)):
        times = [times]
    times = [_checks.real("times", t, low=eps, low_open=True) for t in times]
    if not times or any(b >= a for a, b in zip(times, times[1:])):
        raise ValueError(f"times must be a non-empty, strictly decreasing sequence of times > eps = {eps}, "
                         f"got {times}")
    if isinstance(x, (tuple, list, torch.Size)):
        shape = tuple(x)
        if len(shape) < 1 or any(not isinstance(n, int) or n < 1 for n in shape):
            raise ValueError(f"x must be a tensor or a shape tuple of positive ints (batch, *dims), got {shape}")
        x = times[0] * torch.randn(shape, generator=generator, dtype=dtype, device=device)
    x = _checks.batched("x", x)
    ts = torch.tensor(times, dtype=x.dtype, device=x.device)
    xs = []
    for k, tau in enumerate(ts.unbind()):
        if k > 0:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + math.sqrt(times[k] ** 2 - eps**2) * z
        x = f(x, tau.expand(x.shape[0]))
        if return_trajectory:
            xs.append(x)
    return Solution(x, ts, torch.stack(xs) if return_trajectory else None, len(times))


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """In place: ``p_target <- decay p_target + (1 - decay) p_online`` for every parameter; buffers copied."""
    decay = _checks.real("decay", decay, low=0.0, high=1.0)
    for name, module in (("target", target), ("online", online)):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(module).__name__}")
    pt, po = list(target.parameters()), list(online.parameters())
    if len(pt) != len(po) or any(a.shape != b.shape for a, b in zip(pt, po)):
        raise ValueError("target and online must have parameters of the same shapes (e.g. a deepcopy)")
    for a, b in zip(pt, po):
        a.lerp_(b.to(a.dtype), 1.0 - decay)
    for a, b in zip(target.buffers(), online.buffers()):
        a.copy_(b)
