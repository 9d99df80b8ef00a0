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


def run_both(sde=None, backend="eager", seed=0, mode="auto", **kwargs):
    """``(sampler, compiled solution, sample_ode's solution)`` for the mixture's score from the same draws."""
    sde = VPSDE() if sde is None else sde
    score = mixture().score_fn(sde)
    x = prior_draws(sde, seed=seed)
    sampler = CompiledODESampler(score, sde, backend=backend, mode=mode, **kwargs)
    return sampler, sampler(x), sample_ode(score, sde, x, **kwargs)


@pytest.mark.parametrize("solver", FIXED_STEP)
def test_traced_loop_equals_sample_ode(solver):
    # backend="eager" runs dynamo's capture (fullgraph: one graph, no breaks) without code generation.
    _, got, ref = run_both(steps=6, solver=solver)
    assert torch.equal(got.ts, ref.ts)
    assert (got.x - ref.x).abs().max().item() <= 1e-12 * max(1.0, ref.x.abs().max().item())
    assert got.nfe == ref.nfe
    assert not torch.equal(got.x, prior_draws(VPSDE()))  # it moved


@pytest.mark.parametrize("sde_name", ["vp_cosine", "subvp_linear", "ve", "edm"])
def test_traced_loop_on_every_process(sde_name):
    _, got, ref = run_both(SDE_FACTORIES[sde_name](), steps=5, grid="karras")
    assert (got.x - ref.x).abs().max().item() <= 1e-12 * max(1.0, ref.x.abs().max().item())


def test_inductor_program_matches_eager_and_is_reused():
    sampler, got, ref = run_both(backend="inductor", steps=4, solver="unipc")
    assert (got.x - ref.x).abs().max().item() < 1e-10
    x = prior_draws(sampler.sde, seed=1)  # the second call replays the compiled program on new inputs
    ref = sample_ode(mixture().score_fn(sampler.sde), sampler.sde, x, steps=4, solver="unipc")
    assert (sampler(x).x - ref.x).abs().max().item() < 1e-10
    assert len(sampler._programs) == 1


@pytest.mark.parametrize("mode", ["reduce-overhead", "default", "auto"])
def test_modes_are_inductors_only(mode):
    # Modes configure Inductor; with another backend (which would ignore them) none is passed.
    sampler, got, ref = run_both(steps=3, mode=mode)
    assert (got.x - ref.x).abs().max().item() < 1e-12
    assert [key[2] for key in sampler._programs] == [None]


def test_many_samplers_do_not_share_one_recompile_budget():
    # Dynamo allows 8 variants per code object; every sampler gets a code object of its own.
    for steps in range(2, 13):
        _, got, ref = run_both(steps=steps, solver="dpmpp_2m")
        assert (got.x - ref.x).abs().max().item() < 1e-12


def test_user_grid():
    grid = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.01], dtype=F64)
    _, got, ref = run_both(grid=grid, solver="heun")
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
