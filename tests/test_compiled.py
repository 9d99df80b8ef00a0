"""Compiled samplers: the traced loop is sample_ode's / sample_sde's loop (same result, same NFE) on every fixed-step solver."""

import math

import pytest
import torch

import sdediff
from sdediff import (CompiledODESampler, CompiledSDESampler, GaussianMixture, NonFiniteError, VPSDE, available_solvers,
                     get_solver, sample_ode, sample_sde)
from sdediff.solvers.external import TorchsdeSolver

from conftest import SDE_FACTORIES, graphs_compiled_by

F64 = torch.float64
FIXED_STEP = [name for name, info in available_solvers("ode").items() if not info.adaptive]
FIXED_STEP_SDE = [name for name in available_solvers("sde")  # torchsde's solvers run their own loops
                  if not isinstance(get_solver(name, "sde"), TorchsdeSolver)]


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


@pytest.mark.parametrize("solver", ["unipc", "heun"])  # on the data prediction, and on the drift
@pytest.mark.parametrize("sde_name", sorted(SDE_FACTORIES))
def test_traced_loop_on_every_process(sde_name, solver):
    _, got, ref = run_both(SDE_FACTORIES[sde_name](), steps=5, grid="karras", solver=solver)
    assert (got.x - ref.x).abs().max().item() <= 1e-12 * max(1.0, ref.x.abs().max().item())


def test_inductor_program_matches_eager_and_is_reused():
    sampler, got, ref = run_both(backend="inductor", steps=4, solver="unipc")
    assert (got.x - ref.x).abs().max().item() < 1e-10
    x = prior_draws(sampler.sde, seed=1)  # the second call replays the compiled program on new inputs
    ref = sample_ode(mixture().score_fn(sampler.sde), sampler.sde, x, steps=4, solver="unipc")
    assert graphs_compiled_by(lambda: sampler(x)) == 0
    assert (sampler(x).x - ref.x).abs().max().item() < 1e-10


def test_one_compile_per_shape():
    # The test bed's score fills a per-device cache on its first call: traced then, the second call
    # would compile again. Nine batch sizes exceed dynamo's 8 variants per code object.
    sde = VPSDE()
    sampler = CompiledODESampler(mixture().score_fn(sde), sde, steps=3, backend="eager")
    assert graphs_compiled_by(lambda: [sampler(prior_draws(sde, seed=s)) for s in range(3)]) == 1
    assert graphs_compiled_by(lambda: [sampler(prior_draws(sde, n=n)) for n in range(1, 10)]) == 9
    sde_sampler = CompiledSDESampler(mixture().score_fn(sde), sde, steps=3, backend="eager")
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    assert graphs_compiled_by(lambda: [sde_sampler(prior_draws(sde), generator=g) for g in gens]) == 1


def test_inference_only_and_a_fresh_grid():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def score(x, t):
        return net(torch.cat([x, t[:, None]], 1))

    sde = VPSDE()
    sampler = CompiledODESampler(score, sde, steps=3, backend="eager")
    x = prior_draws(sde)
    with torch.enable_grad():
        got = sampler(x)
    assert not got.x.requires_grad  # no graph kept through the unrolled loop
    with torch.no_grad():
        assert graphs_compiled_by(lambda: sampler(x)) == 0  # the grad mode is not a new variant
    got.ts.mul_(0.5)  # the returned grid is the caller's; the program's own is untouched
    assert torch.equal(sampler(x).x, got.x)


@pytest.mark.parametrize("mode", ["reduce-overhead", "default", "auto"])
def test_modes_are_inductors_only(mode):
    # Modes configure Inductor; with another backend (which would ignore them) none is passed.
    sampler, got, ref = run_both(steps=3, mode=mode)
    assert (got.x - ref.x).abs().max().item() < 1e-12
    assert [key[-1] for key in sampler._programs] == [None]


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
    with pytest.raises(NonFiniteError, match=r"after step 3 \(t = 0\.4006.*score_fn returned non-finite") as err:
        sampler(prior_draws(sde))
    assert ts[3].item() < 0.5 < ts[2].item()
    assert err.value.calls == 4


@pytest.mark.parametrize("solver", ["heun", "rk4", "dpm_solver_3", "unipc"])
def test_a_score_failing_at_any_stage_is_blamed_as_in_sample_ode(solver):
    """The traced loop records each score call's checksum as sample_ode's monitor does: the same
    failing step, the same call count and the same verdict, for one and several calls per step."""
    sde = VPSDE()

    def broken(x, t):
        return torch.where((t < 0.5)[:, None], torch.full_like(x, float("nan")), -x)

    x = torch.ones(4, 2, dtype=F64)
    with pytest.raises(NonFiniteError) as eager:
        sample_ode(broken, sde, x, steps=7, solver=solver, grid="uniform")
    sampler = CompiledODESampler(broken, sde, steps=7, solver=solver, grid="uniform", backend="eager")
    with pytest.raises(NonFiniteError, match="score_fn returned non-finite values") as compiled:
        sampler(x)
    assert str(compiled.value) == str(eager.value)
    assert compiled.value.calls == eager.value.calls


def test_an_overflowing_state_is_not_blamed_on_the_score():
    """As in sample_ode: Euler on VESDE(sigma_max=1e6) overflows float32 after step 4; the score
    -x of that infinite state is infinite too, but only after the state failed."""
    sde = sdediff.VESDE(sigma_max=1e6)
    sampler = CompiledODESampler(lambda x, t: -x, sde, steps=8, solver="euler", grid="uniform", backend="eager")
    with pytest.raises(NonFiniteError, match=r"after step 4 \(t = 0\.5005 -> 0\.375625\)$") as err:
        sampler(torch.ones(4, 2))
    assert err.value.calls == 5


def test_a_float32_score_that_overflows_a_float16_state_is_blamed():
    """As in sample_ode: the record checks the score cast to the state's dtype."""
    sde = sdediff.VESDE()
    x = sde.prior_sample((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float16)
    sampler = CompiledODESampler(lambda y, t: torch.full(y.shape, 1e6), sde, steps=4, solver="euler", backend="eager")
    with pytest.raises(NonFiniteError, match="after step 0 .*score_fn returned non-finite"):
        sampler(x)


def test_the_sde_sampler_blames_a_failing_score():
    sde = VPSDE()

    def broken(x, t):
        return torch.where((t < 0.5)[:, None], torch.full_like(x, math.inf), -x)

    sampler = CompiledSDESampler(broken, sde, steps=5, grid="uniform", backend="eager")
    with pytest.raises(NonFiniteError, match=r"after step 3 .*score_fn returned non-finite"):
        sampler(prior_draws(sde), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(solver="dopri5"), "fixed-step sdediff solver"),
    (dict(solver="euler_maruyama"), "SDE solver"),
    (dict(mode="fast"), "mode must be one of"),
    (dict(backend=3), "backend must be"),
    (dict(grid=torch.tensor([1.0, 0.5, 0.1]), t_end=0.1), "set by the grid tensor"),
    (dict(steps=0), "steps must be"),
    (dict(grid=torch.tensor([1.0, 0.5, 0.1]), steps=5), "disagrees with the grid"),  # as sample_ode
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


def replay(noise):
    """A ``brownian`` for sample_sde that hands out ``noise[i] sqrt(|dt|)`` at its i-th call, as the compiled loop does."""
    calls = iter(range(len(noise)))

    def brownian(t0, t1):
        return noise[next(calls)] * (t1 - t0).abs().sqrt()

    return brownian


@pytest.mark.parametrize("solver", FIXED_STEP_SDE)
@pytest.mark.parametrize("noise_free_last_step", [True, False])
def test_traced_sde_loop_equals_sample_sde(solver, noise_free_last_step):
    sde = VPSDE()
    score = mixture().score_fn(sde)
    x = prior_draws(sde)
    noise = torch.randn((6,) + x.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    kwargs = dict(steps=6, solver=solver, noise_free_last_step=noise_free_last_step)
    got = CompiledSDESampler(score, sde, backend="eager", **kwargs)(x, noise=noise)
    ref = sample_sde(score, sde, x, brownian=replay(noise), **kwargs)
    assert (got.x - ref.x).abs().max().item() <= 1e-12 * max(1.0, ref.x.abs().max().item())
    assert got.nfe == ref.nfe
    if noise_free_last_step:  # the last draw is not used
        noise[-1] += 1.0
        again = CompiledSDESampler(score, sde, backend="eager", **kwargs)(x, noise=noise)
        assert torch.equal(again.x, got.x)


@pytest.mark.parametrize("sde_name", sorted(SDE_FACTORIES))
def test_traced_sde_loop_on_every_process(sde_name):
    """Euler–Maruyama reads the drift (f and g^2 of the schedule at a 0-d time) inside the graph."""
    sde = SDE_FACTORIES[sde_name]()
    score = mixture().score_fn(sde)
    x = prior_draws(sde)
    noise = torch.randn((5,) + x.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    got = CompiledSDESampler(score, sde, steps=5, backend="eager")(x, noise=noise)
    ref = sample_sde(score, sde, x, steps=5, brownian=replay(noise))
    assert (got.x - ref.x).abs().max().item() <= 1e-12 * max(1.0, ref.x.abs().max().item())


def test_sde_sampler_draws_its_noise_from_the_generator():
    sde = VPSDE()
    score = mixture().score_fn(sde)
    x = prior_draws(sde)
    sampler = CompiledSDESampler(score, sde, steps=4, stochasticity=0.5, grid="log_snr")
    a = sampler(x, generator=torch.Generator().manual_seed(7))
    b = sampler(x, generator=torch.Generator().manual_seed(7))
    c = sampler(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.x, b.x) and not torch.allclose(a.x, c.x)
    noise = torch.randn((4,) + x.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    ref = sample_sde(score, sde, x, steps=4, stochasticity=0.5, grid="log_snr", brownian=replay(noise))
    assert (a.x - ref.x).abs().max().item() < 1e-10  # Inductor-compiled, float64


@pytest.mark.parametrize("kwargs, message", [
    (dict(solver="srk"), "fixed-step sdediff solver"),
    (dict(solver="heun"), "ODE solver"),
    (dict(stochasticity=-1.0), "stochasticity"),
    (dict(solver="sde_dpmpp_2m", stochasticity=0.5), "stochasticity 1"),
])
def test_bad_sde_arguments(kwargs, message):
    sde = VPSDE()
    with pytest.raises((ValueError, TypeError), match=message):
        CompiledSDESampler(mixture().score_fn(sde), sde, **kwargs)


def test_bad_noise():
    sde = VPSDE()
    sampler = CompiledSDESampler(mixture().score_fn(sde), sde, steps=3, backend="eager")
    x = prior_draws(sde)
    with pytest.raises(ValueError, match=r"noise must be a tensor of shape \(steps, batch, \*dims\) = \(3, 16, 2\)"):
        sampler(x, noise=torch.zeros(2, 16, 2))
    with pytest.raises(ValueError, match="not both"):
        sampler(x, noise=torch.zeros(3, 16, 2), generator=torch.Generator())
