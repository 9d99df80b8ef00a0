"""Consistency models on an exact test bed: a Gaussian's consistency function is known in closed form.

For data ``N(mu, diag s^2)`` on EDMSDE the probability-flow ODE is linear per coordinate,
``x_t - mu = (x_eps - mu) sqrt(s^2 + t^2) / sqrt(s^2 + eps^2)``, so
``f*(x, t) = mu + (x - mu) sqrt(s^2 + eps^2) / sqrt(s^2 + t^2)``.
"""

import copy
import math

import pytest
import torch

from sdediff import EDMSDE, VPSDE, GaussianMixture, Solution, sample_ode
from sdediff.consistency import (ConsistencyFunction, c_out, c_skip, consistency_distillation_loss,
                                 consistency_training_loss, ema_update, karras_boundaries, sample_consistency)

EPS = 0.002
MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
S = torch.tensor([0.7, 1.3], dtype=torch.float64)
GM = GaussianMixture([1.0], [MU.tolist()], [S.tolist()])
SCORE = GM.score_fn(EDMSDE())


def exact_f(mu=MU, s=S, eps=EPS):
    def f(x, t):
        t = t.reshape(-1, 1)
        return mu + (x - mu) * torch.sqrt(s**2 + eps**2) / torch.sqrt(s**2 + t**2)

    return f


class Net(torch.nn.Module):
    def __init__(self, d=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(d + 1, 16), torch.nn.Tanh(), torch.nn.Linear(16, d)).double()

    def forward(self, x, t):
        return self.body(torch.cat([x, torch.log(t)[:, None]], 1))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_boundary_condition_is_exact():
    f = ConsistencyFunction(Net())
    x = 3.0 * torch.randn(64, 2, generator=gen(0), dtype=torch.float64)
    t_eps = torch.full((64,), EPS, dtype=torch.float64)
    assert torch.equal(f(x, t_eps), x)
    assert torch.equal(f(x, torch.tensor(EPS, dtype=torch.float64)), x)  # 0-d time broadcast
    assert c_skip(t_eps).eq(1.0).all() and c_out(t_eps).eq(0.0).all()
    assert (f(x, t_eps + 1.0) - x).abs().max() > 1e-3  # away from eps the network counts
    t = torch.tensor([0.5, 80.0], dtype=torch.float64)
    assert torch.allclose(f.c_skip(t), 0.25 / ((t - EPS) ** 2 + 0.25))
    assert torch.allclose(f.c_out(t), 0.5 * (t - EPS) / torch.sqrt(0.25 + t**2))
    assert {n for n, _ in f.named_parameters()} == {"network." + n for n, _ in Net().named_parameters()}


def test_karras_boundaries():
    ts = karras_boundaries(18)
    u = torch.arange(18, dtype=torch.float64) / 17
    ref = (EPS ** (1 / 7) + u * (80.0 ** (1 / 7) - EPS ** (1 / 7))) ** 7
    assert ts.shape == (18,) and ts[0].item() == EPS and ts[-1].item() == 80.0
    assert torch.allclose(ts, ref, rtol=1e-13) and bool((ts.diff() > 0).all())


@pytest.mark.parametrize("t", [0.05, 0.7, 5.0, 80.0])
def test_exact_consistency_function_matches_pf_ode(t):
    x = GM.diffused(EDMSDE(), t).sample(16, generator=gen(1))
    ode = sample_ode(SCORE, EDMSDE(), x, solver="dopri5", t_start=t, t_end=EPS, rtol=1e-10, atol=1e-10)
    ones = torch.full((16,), t, dtype=torch.float64)
    assert (ode.x - exact_f()(x, ones)).abs().max() < 1e-7


def _slope(loss_fn, Ns=(20, 80)):
    lo, hi = (loss_fn(N).mean().item() for N in Ns)
    return math.log(hi / lo) / math.log(Ns[1] / Ns[0]), lo, hi


X0 = GM.sample(4000, generator=gen(2))


@pytest.mark.parametrize("solver, order", [("euler", 1), ("ddim", 1), ("heun", 2), ("dpm_solver_2", 2), ("rk4", 4)])
def test_cd_loss_vanishes_at_the_teachers_order(solver, order):
    # f = f_target = f*: the loss is k(t_n)^2 |teacher's local error|^2 = O(dt^(2 order + 2)).
    def loss(N, f=exact_f()):
        return consistency_distillation_loss(f, f, SCORE, X0, N=N, solver=solver, generator=gen(3))

    slope, _, hi = _slope(loss)
    assert abs(slope + 2 * order + 2) < 0.6, slope
    # An inconsistent f (the consistency function of a wider Gaussian) violates consistency at O(dt):
    # its loss falls only as dt^2 and stays far above f*'s.
    wrong = exact_f(s=1.3 * S)
    slope_w, _, hi_w = _slope(lambda N: loss(N, wrong))
    assert abs(slope_w + 2.0) < 0.6 and slope_w > slope + 1.0, slope_w  # -> -2 (euler: -2.5 at N = 20..80)
    assert hi_w > 50 * hi


def test_ddim_teacher_is_euler_on_edm():
    a, b = (consistency_distillation_loss(exact_f(), exact_f(), SCORE, X0[:500], N=10, solver=s, generator=gen(4))
            for s in ("ddim", "euler"))
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_ct_loss_is_order_dt_squared():
    f = exact_f()
    slope, lo, hi = _slope(lambda N: consistency_training_loss(f, f, X0, N=N, generator=gen(5)))
    assert 12.0 < lo / hi < 20.0, lo / hi  # N = 20 -> 80: (dt ratio)^2 ~ 16


def test_ct_equals_cd_with_euler_for_point_mass_data():
    # Data = one point x0: its exact score is -(x - x0)/t^2, and the Euler step of the PF-ODE from
    # x0 + t' z to t is exactly x0 + t z, CT's target point. Same draws => the same losses.
    point = torch.tensor([0.3, -1.2], dtype=torch.float64)
    x0 = point.expand(300, 2).clone()
    f = ConsistencyFunction(Net(seed=1))
    ct = consistency_training_loss(f, f, x0, N=12, distance="pseudo_huber", generator=gen(6))
    cd = consistency_distillation_loss(f, f, lambda x, t: -(x - point) / t[:, None] ** 2, x0, N=12,
                                       solver="euler", distance="pseudo_huber", generator=gen(6))
    assert torch.allclose(ct, cd, rtol=1e-9, atol=1e-15)


def test_ct_gradient_pulls_towards_the_consistency_function():
    # f_theta = consistency function of N(mu, theta^2 I); theta* = s. Per-sample gradients (theta per sample).
    mu, s, n = 1.0, 0.8, 20000
    x0 = GaussianMixture([1.0], [[mu, mu]], [s]).sample(n, generator=gen(7))
    for fac, sign in ((0.8, -1.0), (1.25, 1.0)):
        theta = torch.full((n, 1), fac * s, dtype=torch.float64, requires_grad=True)

        def f(x, t, th=theta):
            return mu + (x - mu) * torch.sqrt(th**2 + EPS**2) / torch.sqrt(th**2 + t[:, None] ** 2)

        loss = consistency_training_loss(f, lambda x, t: f(x, t, theta.detach()), x0, N=40, generator=gen(8))
        (grad,) = torch.autograd.grad(loss.sum(), theta)
        z = grad.mean() / (grad.std() / math.sqrt(n))
        assert sign * z > 4.5, (fac, z.item())


def test_distances_and_weightings():
    x0 = torch.zeros(50, 3, dtype=torch.float64)
    a = 0.1
    f, target = (lambda x, t: torch.full_like(x, a)), (lambda x, t: torch.zeros_like(x))
    seen = []

    def record(lo, hi):
        seen.append((lo, hi))
        return torch.ones_like(lo)

    l2 = consistency_training_loss(f, target, x0, N=5, weighting=record, generator=gen(9))
    l1 = consistency_training_loss(f, target, x0, N=5, distance="l1", generator=gen(9))
    hub = consistency_training_loss(f, target, x0, N=5, distance="pseudo_huber", generator=gen(9))
    gap = consistency_training_loss(f, target, x0, N=5, weighting="inverse_gap", generator=gen(9))
    c = 0.00054 * math.sqrt(3)
    assert torch.allclose(l2, torch.full_like(l2, 3 * a * a)) and torch.allclose(l1, torch.full_like(l1, 3 * a))
    assert torch.allclose(hub, torch.full_like(hub, math.sqrt(3 * a * a + c * c) - c))
    ts = karras_boundaries(5)
    lo, hi = seen[0]
    idx = torch.searchsorted(ts, lo)
    assert torch.equal(ts[idx], lo) and torch.equal(ts[idx + 1], hi) and set(idx.tolist()) == {0, 1, 2, 3}
    assert torch.allclose(gap, l2 / (hi - lo))


def _moments_ok(x, mean, var):
    n = x.shape[0]
    se_m, se_v = torch.sqrt(var / n), var * math.sqrt(2.0 / n)
    assert ((x.mean(0) - mean).abs() < 4.5 * se_m).all(), (x.mean(0), mean)
    assert ((x.var(0) - var).abs() < 4.5 * se_v).all(), (x.var(0), var)


def test_one_step_sampling_with_the_exact_consistency_function():
    n, T = 20000, 80.0
    target_var = S**2 + EPS**2
    # From the true marginal at T the result is exactly the data diffused to eps.
    xT = GM.diffused(EDMSDE(), T).sample(n, generator=gen(10))
    sol = sample_consistency(exact_f(), xT)
    assert isinstance(sol, Solution) and sol.nfe == 1 and sol.ts.tolist() == [T]
    _moments_ok(sol.x, MU, target_var)
    # From the prior N(0, T^2): a mean offset mu k(T) ~ mu s / T (~ 0.01, a few standard errors here) and
    # a variance factor T^2 / (s^2 + T^2); checked against that push-forward.
    sol = sample_consistency(exact_f(), (n, 2), generator=gen(11), dtype=torch.float64)
    k = torch.sqrt(target_var) / torch.sqrt(S**2 + T**2)
    _moments_ok(sol.x, MU * (1 - k), (T * k) ** 2)


def test_multistep_sampling_with_the_exact_consistency_function():
    n, times = 20000, (80.0, 10.0, 1.0, 0.2)
    xT = GM.diffused(EDMSDE(), 80.0).sample(n, generator=gen(12))
    sol = sample_consistency(exact_f(), xT, times=times, return_trajectory=True, generator=gen(13))
    assert sol.nfe == 4 and sol.ts.tolist() == list(times) and sol.xs.shape == (4, n, 2)
    assert torch.equal(sol.xs[-1], sol.x)
    _moments_ok(sol.x, MU, S**2 + EPS**2)
    # f is called once per time, at that time, with t of shape (batch,).
    calls = []
    sample_consistency(lambda x, t: calls.append(t) or x, (5, 2), times=times, generator=gen(14), dtype=torch.float64)
    assert [c[0].item() for c in calls] == list(times) and all(c.shape == (5,) for c in calls)


def test_ct_loss_backprops_into_the_online_network_only():
    f = ConsistencyFunction(Net(seed=2))
    f_ema = copy.deepcopy(f)
    x0 = X0[:64]
    consistency_training_loss(f, f_ema, x0, N=10, generator=gen(15)).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in f.parameters())
    assert all(p.grad is None for p in f_ema.parameters())
    # f_target = f itself: the target is a constant, so the gradient equals that with a frozen copy.
    g_copy = [p.grad.clone() for p in f.parameters()]
    f.zero_grad()
    consistency_training_loss(f, f, x0, N=10, generator=gen(15)).mean().backward()
    assert all(torch.allclose(p.grad, g, rtol=1e-12, atol=0) for p, g in zip(f.parameters(), g_copy))
    # ...and CD likewise, with the teacher outside the graph.
    f.zero_grad()
    consistency_distillation_loss(f, f_ema, SCORE, x0, N=10, generator=gen(15)).mean().backward()
    assert all(p.grad is not None for p in f.parameters()) and all(p.grad is None for p in f_ema.parameters())


def test_ema_update():
    online, target = ConsistencyFunction(Net(seed=3)), ConsistencyFunction(Net(seed=4))
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for p_t, p_b, p_o in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(p_t, 0.9 * p_b + 0.1 * p_o, rtol=1e-14) and p_t.grad is None
    ema_update(target, online, 0.0)
    assert all(torch.allclose(a, b) for a, b in zip(target.parameters(), online.parameters()))


def test_validation_errors():
    f = exact_f()
    x0 = X0[:8]
    with pytest.raises(ValueError, match="N must be an int >= 2"):
        consistency_training_loss(f, f, x0, N=1)
    with pytest.raises(TypeError, match="N must be an int"):
        consistency_training_loss(f, f, x0, N=10.0)
    with pytest.raises(ValueError, match="distance must be one of"):
        consistency_training_loss(f, f, x0, N=10, distance="l3")
    with pytest.raises(ValueError, match="weighting must be one of"):
        consistency_training_loss(f, f, x0, N=10, weighting="snr")
    with pytest.raises(TypeError, match="sde must be an sdediff EDMSDE"):
        consistency_training_loss(f, f, x0, N=10, sde=VPSDE())
    with pytest.raises(ValueError, match="huber_c must be in"):
        consistency_training_loss(f, f, x0, N=10, distance="pseudo_huber", huber_c=-1.0)
    with pytest.raises(TypeError, match="f_target must be callable"):
        consistency_training_loss(f, None, x0, N=10)
    for bad in ("dpmpp_2m", "dopri5", "unipc"):
        with pytest.raises(ValueError, match="single-step, fixed-step"):
            consistency_distillation_loss(f, f, SCORE, x0, N=10, solver=bad)
    with pytest.raises(ValueError, match="is an SDE solver"):
        consistency_distillation_loss(f, f, SCORE, x0, N=10, solver="euler_maruyama")
    with pytest.raises(TypeError, match="teacher_score_fn must be callable"):
        consistency_distillation_loss(f, f, 1.0, x0, N=10)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_consistency(f, x0, times=(1.0, 10.0))
    with pytest.raises(ValueError, match="times must be in"):
        sample_consistency(f, x0, times=(80.0, 0.001))
    with pytest.raises(ValueError, match="shape tuple of positive ints"):
        sample_consistency(f, (0, 2))
    with pytest.raises(ValueError, match="eps must be in"):
        karras_boundaries(10, eps=0.0)
    with pytest.raises(ValueError, match="T must be in"):
        karras_boundaries(10, eps=1.0, T=0.5)
    with pytest.raises(ValueError, match="decay must be in"):
        ema_update(Net(), Net(), 1.5)
    with pytest.raises(ValueError, match="same shapes"):
        ema_update(Net(d=2), Net(d=3), 0.5)
    with pytest.raises(TypeError, match="network must be callable"):
        ConsistencyFunction(3)
    with pytest.raises(ValueError, match="sigma_data must be in"):
        ConsistencyFunction(Net(), sigma_data=0.0)
    with pytest.raises(ValueError, match="network must return a tensor of the shape"):
        ConsistencyFunction(lambda x, t: x[:, :1])(x0, torch.ones(8, dtype=torch.float64))
