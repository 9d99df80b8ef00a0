"""Progressive distillation: the target makes one student DDIM step equal two teacher DDIM steps."""

import math

import pytest
import torch

from sdediff import EDMSDE, VPSDE, GaussianMixture, ReverseProcess, get_solver, integrate, score_from_x0
from sdediff.distillation import (DistillationTarget, progressive_distillation_loss, progressive_distillation_target,
                                  snr_weight)

from conftest import SDE_FACTORIES

MIX = GaussianMixture([0.3, 0.7], [[1.0, -1.0], [-0.5, 0.8]], [0.4, 0.9])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _times(sde, n, seed):
    """Per-sample ``0 <= s < t <= T``; the first sample steps down to s = 0, another starts at T."""
    g = gen(seed)
    t = sde.T * (0.02 + 0.98 * torch.rand(n, generator=g, dtype=torch.float64))
    s = t * torch.rand(n, generator=g, dtype=torch.float64)
    t[1], s[0] = sde.T, 0.0
    return t, s


@pytest.mark.parametrize("name", list(SDE_FACTORIES))
def test_one_student_step_lands_on_the_teachers_two_steps(name):
    sde = SDE_FACTORIES[name]()
    score = MIX.score_fn(sde)
    t, s = _times(sde, 8, 0)
    x_t = MIX.diffused(sde, 0.5 * sde.T).sample(8, generator=gen(1))
    target = progressive_distillation_target(score, sde, x_t, t, s)
    assert isinstance(target, DistillationTarget) and target.x0.shape == x_t.shape
    ddim = get_solver("ddim", "ode")
    scale = 1.0 + x_t.abs().max().item()
    for i in range(8):
        # the teacher, independently: sdediff's loop with DDIM over the grid t -> (t + s)/2 -> s (s may be 0)
        grid = torch.tensor([t[i], 0.5 * (t[i] + s[i]), s[i]], dtype=torch.float64)
        teacher = integrate(ReverseProcess(sde, score, 0.0).ode_term(), x_t[i:i + 1], grid, solver="ddim").x
        # the student: one DDIM step with x0 = target (an x0-predicting model)
        student = ReverseProcess(sde, score_from_x0(lambda x, tt: target.x0[i:i + 1], sde), 0.0).ode_term()
        landed = ddim.step(student, x_t[i:i + 1], t[i], s[i])
        assert (landed - teacher).abs().max() < 1e-12 * scale, (i, (landed - teacher).abs().max().item())
        assert (target.x_s[i] - teacher[0]).abs().max() < 1e-12 * scale
    a_t, sig_t = (c[:, None] for c in sde.marginal(t))
    assert torch.allclose(target.eps, (x_t - a_t * target.x0) / sig_t, rtol=1e-10, atol=1e-10)


def _exact_flow(sde, x_t, t, s, mu, std):
    """The PF-ODE solution from (x_t, t) to time s for data N(mu, std^2 I)."""
    (a_t, sig_t), (a_s, sig_s) = sde.marginal(t), sde.marginal(s)
    return a_s * mu + (x_t - a_t * mu) * math.sqrt((a_s**2 * std**2 + sig_s**2) / (a_t**2 * std**2 + sig_t**2))


@pytest.mark.parametrize("name", ["vp_linear", "edm"])
def test_two_step_teacher_converges_to_the_exact_flow(name):
    # DDIM is first order: over an interval h its two-step error is O(h^2); the implied x0 target's O(h).
    sde = SDE_FACTORIES[name]()
    mu, std = 0.7, 0.5
    gauss = GaussianMixture([1.0], [[mu, mu]], [std])
    score = gauss.score_fn(sde)
    t = 0.3 * sde.T
    x_t = gauss.diffused(sde, t).sample(64, generator=gen(2))
    errs, x0_errs = [], []
    for h in (0.1 * t, 0.05 * t, 0.025 * t):
        target = progressive_distillation_target(score, sde, x_t, t, t - h)
        exact = _exact_flow(sde, x_t, t, t - h, mu, std)
        (a_t, sig_t), (a_s, sig_s) = sde.marginal(t), sde.marginal(t - h)
        exact_x0 = (exact - sig_s / sig_t * x_t) / (a_s - sig_s / sig_t * a_t)
        errs.append((target.x_s - exact).abs().max().item())
        x0_errs.append((target.x0 - exact_x0).abs().max().item())
    for k in range(2):
        assert 3.2 < errs[k] / errs[k + 1] < 4.8, errs
        assert 1.6 < x0_errs[k] / x0_errs[k + 1] < 2.4, x0_errs
    assert errs[-1] > 0.0


def _oracle(score, sde, N, prediction):
    """The student whose one-step DDIM equals the two-step teacher on the N-step grid t = i T / N."""

    def student(x_t, t):
        i = torch.round(t * N / sde.T)
        s = (i - 1.0) * sde.T / N
        tgt = progressive_distillation_target(score, sde, x_t, t, s)
        a, sig = (c[:, None] for c in sde.marginal(t))
        return {"x0": tgt.x0, "eps": tgt.eps, "v": a * tgt.eps - sig * tgt.x0, "score": -tgt.eps / sig}[prediction]

    return student


@pytest.mark.parametrize("name", ["vp_linear", "subvp_linear", "ve", "edm"])
@pytest.mark.parametrize("prediction", ["x0", "eps", "v", "score"])
def test_loss_vanishes_for_the_oracle_student_only(name, prediction):
    sde = SDE_FACTORIES[name]()
    score = MIX.score_fn(sde)
    x0 = MIX.sample(256, generator=gen(3))
    student = _oracle(score, sde, 8, prediction)
    loss = progressive_distillation_loss(student, score, sde, x0, N=8, prediction=prediction, generator=gen(4))
    assert loss.shape == (256,) and loss.max() < 1e-18, loss.max().item()
    off = progressive_distillation_loss(lambda x, t: student(x, t) + 0.01, score, sde, x0, N=8,
                                        prediction=prediction, generator=gen(4))
    assert bool((off > 1e-9).all())


def test_loss_weighting_and_grid():
    sde = VPSDE()
    score = MIX.score_fn(sde)
    x0 = MIX.sample(500, generator=gen(5))
    seen = []

    def student(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    plain = progressive_distillation_loss(student, score, sde, x0, N=4, weighting="constant", generator=gen(6))
    t = seen[0]
    assert set((t * 4).round().tolist()) == {1.0, 2.0, 3.0, 4.0} and torch.allclose(t * 4, (t * 4).round())
    snr = torch.exp(sde.log_snr(t))
    for weighting, w in (("truncated_snr", snr.clamp(min=1.0)), ("snr", snr), ("snr_plus_one", snr + 1.0)):
        loss = progressive_distillation_loss(student, score, sde, x0, N=4, weighting=weighting, generator=gen(6))
        assert torch.allclose(loss, w * plain, rtol=1e-12)
        assert torch.allclose(snr_weight(sde, t, weighting), w, rtol=1e-12)
    assert bool((snr_weight(sde, t) >= 1.0).all()) and bool((snr.min() < 1.0) & (snr.max() > 1.0))


def test_loss_backprops_into_the_student_only():
    sde = EDMSDE()
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    teacher = torch.nn.Linear(3, 2).double()
    x0 = MIX.sample(64, generator=gen(7))

    def with_time(net):
        return lambda x, t: net(torch.cat([x, torch.log(t)[:, None]], 1))

    teacher_score = score_from_x0(with_time(teacher), sde)
    loss = progressive_distillation_loss(with_time(student), teacher_score, sde, x0, N=4, generator=gen(8))
    loss.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_validation_errors():
    sde = VPSDE()
    score = MIX.score_fn(sde)
    x = MIX.sample(4, generator=gen(9))
    half = torch.full((4,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="s must be smaller than t"):
        progressive_distillation_target(score, sde, x, half, half)
    with pytest.raises(ValueError, match=r"t must be in \[0.0, 1.0\]"):
        progressive_distillation_target(score, sde, x, 1.5, 0.5)
    with pytest.raises(ValueError, match="t has shape"):
        progressive_distillation_target(score, sde, x, torch.ones(3, dtype=torch.float64), 0.1)
    with pytest.raises(TypeError, match="sde must be an sdediff SDE"):
        progressive_distillation_target(score, "vp", x, 0.5, 0.1)
    with pytest.raises(TypeError, match="teacher_score_fn must be callable"):
        progressive_distillation_loss(lambda x, t: x, None, sde, x, N=4)
    with pytest.raises(ValueError, match="prediction must be one of"):
        progressive_distillation_loss(lambda x, t: x, score, sde, x, N=4, prediction="velocity")
    with pytest.raises(ValueError, match="weighting must be one of"):
        progressive_distillation_loss(lambda x, t: x, score, sde, x, N=4, weighting="min_snr")
    with pytest.raises(ValueError, match="N must be an int >= 1"):
        progressive_distillation_loss(lambda x, t: x, score, sde, x, N=0)
    with pytest.raises(ValueError, match="student must return a tensor of the shape"):
        progressive_distillation_loss(lambda x, t: x[:, :1], score, sde, x, N=4)
    with pytest.raises(ValueError, match="weighting must be one of"):
        snr_weight(sde, 0.5, "p2")
