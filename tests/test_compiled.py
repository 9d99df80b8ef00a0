"""CompiledODESampler: the traced loop is sample_ode's loop (same result, same NFE), on every fixed-step ODE solver."""

import math

import pytest
import torch

import sdediff
from sdediff import CompiledODESampler, GaussianMixture, NonFiniteError, VPSDE, available_solvers, sample_ode

from conftest import SDE_FACTORIES

F64 = torch.float64
FIXED_STEP = [name for name, info in available_solvers("ode").items() if not info.adaptive]


def mixture():
    return GaussianMixture([0.3, 0.7], [[1.5, 0.0], [-1.0, 0.5]], [0.2, 0.4])


def prior_draws(sde, n=16, seed=0):
    return sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("solver", FIXED_STEP)
def test_traced_loop_equals_sample_ode(solver):
    # backend="eager" runs dynamo's capture (fullgraph: one graph, no breaks) without code generation.
    sde = VPSDE()
    score = mixture().score_fn(sde)
    x = prior_draws(sde)
    sampler = CompiledODESampler(score, sde, steps=6, solver=solver, backend="eager")
    got = sampler(x)
    ref = sample_ode(score, sde, x, steps=6, solver=solver)
    assert torch.allclose(got.ts, ref.ts, rtol=0, atol=0)
    assert (got.x - ref.x).abs().max().item() <= 1e-12 * max(1.0, ref.x.abs().max().item())
    assert got.nfe == ref.nfe
    assert not torch.equal(got.x, x)  # it moved


@pytest.mark.parametrize("sde_name", ["vp_cosine", "subvp_linear", "ve", "edm"])
def test_traced_loop_on_every_process(sde_name):
    sde = SDE_FACTORIES[sde_name]()
    score = mixture().score_fn(sde)
    x = prior_draws(sde)
    got = CompiledODESampler(score, sde, steps=5, grid="karras", backend="eager")(x)
    ref = sample_ode(score, sde, x, steps=5, grid="karras")
    assert (got.x - ref.x).abs().max().item() <= 1e-12 * max(1.0, ref.x.abs().max().item())


def test_inductor_program_matches_eager_and_is_reused():
    sde = VPSDE()
    score = mixture().score_fn(sde)
    sampler = CompiledODESampler(score, sde, steps=4, solver="unipc")
    for seed in (0, 1):  # the second call replays the compiled program on new inputs
        x = prior_draws(sde, seed=seed)
        got, ref = sampler(x), sample_ode(score, sde, x, steps=4, solver="unipc")
        assert (got.x - ref.x).abs().max().item() < 1e-10
    assert len(sampler._programs) == 1


@pytest.mark.parametrize("mode", ["reduce-overhead", "default", "auto"])
def test_modes_are_inductors_only(mode):
    # Modes configure Inductor; with another backend (which would ignore them) none is passed.
    sde = VPSDE()
    score = mixture().score_fn(sde)
    x = prior_draws(sde)
    sampler = CompiledODESampler(score, sde, steps=3, mode=mode, backend="eager")
    got = sampler(x)
    assert (got.x - sample_ode(score, sde, x, steps=3).x).abs().max().item() < 1e-12
    assert [key[2] for key in sampler._programs] == [None]


def test_many_samplers_do_not_share_one_recompile_budget():
    # Dynamo allows 8 variants per code object; every sampler gets a code object of its own.
    sde = VPSDE()
    score = mixture().score_fn(sde)
    x = prior_draws(sde)
    for steps in range(2, 13):
        got = CompiledODESampler(score, sde, steps=steps, solver="dpmpp_2m", backend="eager")(x)
        ref = sample_ode(score, sde, x, steps=steps, solver="dpmpp_2m")
        assert (got.x - ref.x).abs().max().item() < 1e-12


def test_user_grid():
    sde = VPSDE()
    score = mixture().score_fn(sde)
    x = prior_draws(sde)
    grid = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.01], dtype=F64)
    got = CompiledODESampler(score, sde, grid=grid, solver="heun", backend="eager")(x)
    ref = sample_ode(score, sde, x, grid=grid, solver="heun")
    assert got.nfe == ref.nfe == 8
    assert (got.x - ref.x).abs().max().item() < 1e-12


def test_non_finite_state_names_the_step():
    sde = VPSDE()
    ts = sdediff.time_grid(sde, 5, grid="uniform")

    def score(x, t):  # blows up below t = 0.5: at the step that starts at ts[3] = 0.4006
        return torch.where(t[:, None] < 0.5, torch.full_like(x, math.inf), -x)

    sampler = CompiledODESampler(score, sde, steps=5, solver="euler", grid="uniform", backend="eager")
    with pytest.raises(NonFiniteError, match=r"after step 3 \(t = 0\.4006"):
        sampler(prior_draws(sde))
    assert ts[3].item() < 0.5 < ts[2].item()


@pytest.mark.parametrize("kwargs, message", [
    (dict(solver="dopri5"), "fixed-step solver"),
    (dict(solver="euler_maruyama"), "SDE solver"),
    (dict(mode="fast"), "mode must be one of"),
    (dict(backend=3), "backend must be"),
    (dict(grid=torch.tensor([1.0, 0.5, 0.1]), t_end=0.1), "set by the grid tensor"),
    (dict(steps=0), "steps must be"),
])
def test_bad_arguments(kwargs, message):
    sde = VPSDE()
    with pytest.raises((ValueError, TypeError), match=message):
        CompiledODESampler(mixture().score_fn(sde), sde, **kwargs)


def test_bad_score_and_input():
    sde = VPSDE()
    with pytest.raises(TypeError, match="score_fn"):
        CompiledODESampler(3, sde)
    sampler = CompiledODESampler(mixture().score_fn(sde), sde, steps=2, backend="eager")
    with pytest.raises((ValueError, TypeError), match="x"):
        sampler(torch.tensor(1.0, dtype=F64))
