"""Multistep solvers: one score call per step, earlier evaluations reused (DPM-Solver++, UniPC, LMS).

Each precomputes its coefficients for the whole grid once, in float64 on the host (``init``), so a
step is a few fused tensor operations with Python-float coefficients: no per-step host sync.

Exponential methods work on the data prediction ``x0`` in ``lambda = log(alpha / sigma)``: for a
step from ``t`` to ``s`` with ``h = lambda_s - lambda_t``,

    x_s = (sigma_s / sigma_t) x_t + alpha_s int_0^h e^(u - h) x0(lambda_t + u) du,

and the integral is taken over a polynomial through earlier ``x0`` values (Lu et al. 2022b).
Warm-up steps use the orders the history allows; with ``lower_order_final`` and fewer than 15
steps, the last steps drop to first order (as DPM-Solver++ does for stability). diffusers' UniPC
lowers them at every step count; that costs the asymptotic order (the uncorrected first-order
last step caps it at 2) but helped at 20 steps on the 64-D benchmark mixture (unipc_3: 7.1e-3 ->
2.1e-3), so ``lower_order_final_below`` is a class attribute one can raise.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .base import MultistepSolver, ODESolver, SDESolver, register_solver
from .exponential import exp_weights, grid_table, lagrange_weights, poly_moments

LOWER_ORDER_FINAL_BELOW = 15
_CACHE_SIZE = 32  # grids whose coefficients are kept (least recently used dropped)
_COEFFICIENTS: OrderedDict = OrderedDict()
INTERPOLATIONS = ("lambda", "t")


def _combine(a: float, x: torch.Tensor, weights, values) -> torch.Tensor:
    """``a x + sum_j weights[j] values[j]`` with one allocation."""
    out = torch.mul(x, a)
    for w, v in zip(weights, values):
        out.add_(v, alpha=w)
    return out


class _Multistep(MultistepSolver):
    needs_process = True
    evals_per_step = 1
    default_grid = "log_snr"
    max_order = 2  # the order of the history polynomial (the predictor's)
    lower_order_final_below = LOWER_ORDER_FINAL_BELOW  # step counts at which lower_order_final applies

    def __init__(self, lower_order_final: bool = True):
        self.lower_order_final = bool(lower_order_final)

    def init(self, term, x, ts):
        """``(step index, history, coefficients)``; the coefficients are memoized per solver settings, SDE and grid.

        Sampling batch after batch on one grid is the common case, and computing the coefficients
        on the host costs about as much per step as the rest of the step (measured: 54 of 180 us
        per step of unipc with a trivial score, 50 steps). They are read-only, so sharing them is safe.
        """
        sde = term.process.sde
        grid = tuple(ts.detach().to(device="cpu", dtype=torch.float64).tolist())
        key = (type(self), tuple(sorted(vars(self).items())), self.lower_order_final_below, sde, grid)
        coeffs = _COEFFICIENTS.pop(key, None)
        if coeffs is None:
            coeffs = self.build_coefficients(sde, ts)
        _COEFFICIENTS[key] = coeffs  # most recently used last
        while len(_COEFFICIENTS) > _CACHE_SIZE:
            _COEFFICIENTS.popitem(last=False)
        return 0, (), coeffs

    def build_coefficients(self, sde, ts) -> list:
        """Per step, the Python-float coefficients the step reads (computed once per grid, on the host)."""
        raise NotImplementedError

    def step_orders(self, n: int, hs=None) -> list[int]:
        """The order of each of ``n`` steps: warm-up, then ``max_order``, then the final reduction.

        A step of infinite ``h`` (to ``sigma = 0``, i.e. ``t = 0`` on VP) is first order: it
        returns the data prediction, as DPM-Solver++ (and diffusers) do.
        """
        orders = [min(self.max_order, i + 1) for i in range(n)]
        if self.lower_order_final and n < self.lower_order_final_below:
            for back in range(1, self.max_order):
                if n - back >= 0:
                    orders[n - back] = min(orders[n - back], back)
        if hs is not None:
            orders = [1 if math.isinf(h) else k for k, h in zip(orders, hs)]
        return orders


class _ExponentialMultistep(_Multistep, ODESolver):
    """Data-prediction exponential multistep; subclasses give the weights of ``x0_i, x0_(i-1), ...``.

    ``interpolation``: the variable in which the ``x0`` history is a polynomial: ``"lambda"``, or
    ``"t"`` (the SDE's own time, as DEIS's tAB), where the weights come by quadrature.
    """

    extra_history = 0  # entries kept beyond the predictor's max_order
    interpolation = "lambda"

    def variable(self, sde):
        """``None`` (a polynomial in ``lambda``) or the map ``lambda -> t`` of the interpolation variable."""
        return None if self.interpolation == "lambda" else (lambda lam: sde._t_from_log_snr(2.0 * lam))

    def weights(self, h: float, previous: list[float], order: int, lam: float = 0.0, variable=None) -> list[float]:
        """Weights of ``x0`` at ``lambda_i, lambda_i - previous[0], ...`` in ``int_0^h e^(u-h) x0 du`` (``lambda_i = lam``)."""
        if order == 1:
            return [-math.expm1(-h)]  # also for h = inf
        nodes = [0.0]
        for hp in previous[: order - 1]:
            nodes.append(nodes[-1] - hp)
        return exp_weights(h, nodes, lam, variable)

    def coefficients(self, alpha, sigma, hs, lams, variable=None):
        """Per step: ``(sigma_(i+1)/sigma_i, weights of the history, sigma_i^2)``.

        The history holds ``alpha_j x0_j = x_j + sigma_j^2 score_j`` (one fused operation per
        step), so the weight of entry ``k`` is ``alpha_(i+1) w_k / alpha_(i-k)``.
        """
        coeffs = []
        for i, order in enumerate(self.step_orders(len(hs), hs)):
            w = self.weights(hs[i], hs[:i][::-1], order, lams[i], variable)
            b = [alpha[i + 1] * wk / alpha[i - k] for k, wk in enumerate(w)]
            coeffs.append((sigma[i + 1] / sigma[i], b, sigma[i] ** 2))
        return coeffs

    def build_coefficients(self, sde, ts):
        return self.coefficients(*grid_table(sde, ts), self.variable(sde))

    @staticmethod
    def scaled_x0(term, x, t, sig2):
        """``alpha x0 = x + sigma^2 score`` (Tweedie)."""
        return torch.add(x, term.process.score(x, t), alpha=sig2)

    def step(self, term, x, t0, t1, state):
        i, history, coeffs = state
        a, b, sig2 = coeffs[i]
        history = (self.scaled_x0(term, x, t0, sig2),) + history[: self.max_order + self.extra_history - 1]
        return _combine(a, x, b, history), (i + 1, history, coeffs)


@register_solver
class DPMSolverPP2M(_ExponentialMultistep):
    """DPM-Solver++(2M): ``x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^-h) D``, order 2.

    ``D = (1 + 1/(2r)) x0_i - 1/(2r) x0_(i-1)`` with ``r = h_(i-1) / h_i`` (Lu et al. 2022b, as
    diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, ``solver_type="midpoint"``).
    """

    name, order, max_order = "dpmpp_2m", 2, 2

    def weights(self, h, previous, order, lam=0.0, variable=None):
        return _dpmpp_2m_weights(h, previous, order)


def _dpmpp_2m_weights(h: float, previous: list[float], order: int) -> list[float]:
    """DPM-Solver++(2M)'s weights of ``x0_i, x0_(i-1)``: the linear extrapolation's slope term is
    ``(1 - e^-h) / (2r)`` rather than the exact ``(h - 1 + e^-h) / r``, which damps it on long steps."""
    one = -math.expm1(-h)
    if order == 1:
        return [one]
    r = previous[0] / h
    return [one * (1.0 + 0.5 / r), -one * 0.5 / r]


@register_solver
class DPMSolverPP3M(_ExponentialMultistep):
    """Third-order exponential Adams–Bashforth on ``x0`` (DPM-Solver++(3M) family), order 3.

    The quadratic through ``x0_i, x0_(i-1), x0_(i-2)`` in ``lambda`` is integrated exactly against
    ``e^(u - h)`` (the weights come from :func:`lagrange_weights`, not from a Taylor expansion).
    """

    name, order, max_order = "dpmpp_3m", 3, 3


@register_solver
class UniPC(_ExponentialMultistep):
    """A UniPC-family predictor–corrector (Zhao et al. 2023): order ``p`` predictor, order ``p + 1`` corrector.

    Predictor: of order ``p`` on ``x0``; at order 2 it is DPM-Solver++(2M)'s step (UniPC's UniP-2
    with ``B(h) = e^h - 1``, "bh2"), at order 3 the exponential Adams–Bashforth rule. Corrector:
    once ``x0`` has been evaluated at the predicted point (the next step needs it anyway), the
    step just taken is redone with the exponential Adams–Moulton rule, which includes that new
    node, so the order rises by one at no extra score call (UniC's order conditions for these
    nodes are exactly this rule). The last step is not corrected.

    The damped order-2 predictor matters at 10 steps: with the exact order-2 rule instead, the
    RMSE at NFE 10 was 1.6x (64-D mixture) to 1.2x (2-D ring) larger (``benchmarks/``).
    """

    name, order, max_order = "unipc", 3, 2  # the name carries the predictor order: "unipc" (2), "unipc_3"
    extra_history = 1  # the corrector's extra node

    def __init__(self, predictor_order: int = 2, lower_order_final: bool = True, interpolation: str = "lambda"):
        super().__init__(lower_order_final)
        if predictor_order not in (1, 2, 3, 4):
            raise ValueError(f"predictor_order must be 1, 2, 3 or 4, got {predictor_order!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.max_order, self.order, self.interpolation = predictor_order, predictor_order + 1, interpolation
        self.name = "unipc" + ("" if predictor_order == 2 else f"_{predictor_order}")
        if interpolation == "t":
            self.name, self.default_grid = self.name + "_t", "quadratic"

    def weights(self, h, previous, order, lam=0.0, variable=None):
        if order == 2:
            return _dpmpp_2m_weights(h, previous, order)
        return super().weights(h, previous, order, lam, variable)

    def build_coefficients(self, sde, ts):
        """Fold each correction into the next prediction: one combination per step.

        With ``H = (alpha x0_i, alpha x0_(i-1), ...)``, the corrected state is the predicted one
        plus ``sum_k d_k H_k`` (Adams–Moulton weights minus the previous step's Adams–Bashforth
        weights, the common ``(sigma_i / sigma_(i-1)) x_(i-1)`` cancelling), so
        ``x_(i+1) = a_i x_i + sum_k (a_i d_k + b_k) H_k`` from the predicted ``x_i``.
        """
        alpha, sigma, hs, lams = grid_table(sde, ts)
        variable = self.variable(sde)
        coeffs, fused = self.coefficients(alpha, sigma, hs, lams, variable), []
        for i, order in enumerate(self.step_orders(len(hs), hs)):
            a, b, sig2 = coeffs[i]
            if i > 0 and not math.isinf(hs[i - 1]):
                prev_order = len(coeffs[i - 1][1])
                nodes = [hs[i - 1], 0.0]
                for hp in hs[: i - 1][::-1][: prev_order - 1]:
                    nodes.append(nodes[-1] - hp)
                w = exp_weights(hs[i - 1], nodes, lams[i - 1], variable)  # at lambda_i, lambda_(i-1), ...
                d = [alpha[i] * wk / alpha[i - k] for k, wk in enumerate(w)]
                for k, bk in enumerate(coeffs[i - 1][1]):
                    d[k + 1] -= bk
                b = [a * dk + (b[k] if k < len(b) else 0.0) for k, dk in enumerate(d)]
            fused.append((a, b, sig2))
        return fused


register_solver(UniPC(3))
register_solver(UniPC(4, interpolation="t"))


@register_solver
class LMS(_Multistep, ODESolver):
    """Linear multistep (Adams–Bashforth, as k-diffusion's ``sample_lms``) in sigma time; order 4.

    In ``y = x / alpha`` and ``rho = sigma / alpha`` the probability-flow ODE is ``dy/drho = eps``;
    each step integrates the polynomial through the last ``order`` values of ``eps`` over ``rho``,
    with warm-up from first order. (Adams–Bashforth in log-sigma time, ``dy/dlog(rho) = rho eps``,
    was tried and left out: its integrand carries the ODE's linear part, which the small stability
    region of an explicit multistep method cannot take at 10–50 steps; the exponential methods
    above are the log-SNR-time multistep methods.)
    """

    name, default_grid = "lms", "karras"

    def __init__(self, order: int = 4, lower_order_final: bool = False):
        super().__init__(lower_order_final)
        if order not in (1, 2, 3, 4):
            raise ValueError(f"order must be 1 to 4, got {order!r}")
        self.order = self.max_order = order

    def build_coefficients(self, sde, ts):
        alpha, sigma, _, _ = grid_table(sde, ts)
        rho = [sg / a for sg, a in zip(sigma, alpha)]
        coeffs = []
        for i, order in enumerate(self.step_orders(len(ts) - 1)):
            nodes = [rho[i - j] - rho[i] for j in range(order)]
            w = lagrange_weights(nodes, poly_moments(0.0, rho[i + 1] - rho[i], order))
            # eps = -sigma score, so the score of step i - j enters with weight -alpha_(i+1) w_j sigma_(i-j)
            coeffs.append((alpha[i + 1] / alpha[i], [-alpha[i + 1] * w[j] * sigma[i - j] for j in range(order)]))
        return coeffs

    def step(self, term, x, t0, t1, state):
        i, history, coeffs = state
        a, b = coeffs[i]
        history = (term.process.score(x, t0),) + history[: self.max_order - 1]
        return _combine(a, x, b, history), (i + 1, history, coeffs)


@register_solver
class SDEDPMSolverPP2M(_Multistep, SDESolver):
    """SDE-DPM-Solver++(2M) for the reverse SDE (stochasticity 1); strong order 1 for additive noise.

    ``x_s = (sigma_s/sigma_t) e^-h x_t + alpha_s (1 - e^-2h) D + sigma_s sqrt(1 - e^-2h) z`` with
    ``D = x0_i + 1/(2r) (x0_i - x0_(i-1))`` (first order on the first step); ``z = dW / sqrt(|dt|)``.
    With first order it is the ancestral (DDPM posterior) step.
    """

    name, order, additive_order, max_order = "sde_dpmpp_2m", 0.5, 1.0, 2

    def check_term(self, term):
        super().check_term(term)
        if term.process.stochasticity != 1.0:
            raise ValueError(f"{self.name} samples the reverse SDE with stochasticity 1, "
                             f"got {term.process.stochasticity}")

    def build_coefficients(self, sde, ts):
        alpha, sigma, hs, _ = grid_table(sde, ts)
        t = ts.detach().to(device="cpu", dtype=torch.float64).tolist()
        coeffs = []
        for i, order in enumerate(self.step_orders(len(hs), hs)):
            one = -math.expm1(-2.0 * hs[i]) * alpha[i + 1]
            b = [one] if order == 1 else [one * (1.0 + 0.5 * hs[i] / hs[i - 1]), -one * 0.5 * hs[i] / hs[i - 1]]
            noise = sigma[i + 1] * math.sqrt(-math.expm1(-2.0 * hs[i]) / abs(t[i + 1] - t[i]))
            b = [bk / alpha[i - k] for k, bk in enumerate(b)]  # the history holds alpha x0, as above
            coeffs.append((sigma[i + 1] / sigma[i] * math.exp(-hs[i]), b, sigma[i] ** 2, noise))
        return coeffs

    def step(self, term, x, t0, t1, dw, state):
        i, history, coeffs = state
        a, b, sig2, noise = coeffs[i]
        history = (_ExponentialMultistep.scaled_x0(term, x, t0, sig2),) + history[:1]
        out = _combine(a, x, b, history)
        if dw is not None:
            out.add_(dw, alpha=noise)
        return out, (i + 1, history, coeffs)
