"""On a CUDA device: the samplers, the likelihood and the compiled samplers agree with the CPU.

Skipped without a GPU (the development machine has none); ``benchmarks/gpu_checks.sh`` runs these
with the benchmarks on a lent GPU machine.
"""

import warnings

import pytest
import torch

from conftest import graphs_compiled_by
from sdediff import (CompiledODESampler, CompiledSDESampler, GaussianMixture, VESDE, VPSDE, log_likelihood,
                     sample_ode, sample_sde)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

F64 = torch.float64
CUDA = torch.device("cuda")


def mixture():
    return GaussianMixture([0.3, 0.7], [[1.5, 0.0], [-1.0, 0.5]], [0.2, 0.4])


def draws(sde, n=64):
    return sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(0), dtype=F64)


@pytest.mark.parametrize("solver", ["unipc", "dpmpp_3m", "heun", "ddim", "dopri5"])
@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_sample_ode_on_cuda_matches_cpu(sde, solver):
    score = mixture().score_fn(sde)
    x = draws(sde)
    cpu = sample_ode(score, sde, x, steps=10, solver=solver)
    gpu = sample_ode(score, sde, x.to(CUDA), steps=10, solver=solver)
    assert gpu.x.device.type == "cuda"
    if solver == "dopri5":  # the step-size control may take other steps on other round-off
        assert (gpu.x.cpu() - cpu.x).abs().max().item() < 1e-5
    else:
        assert gpu.nfe == cpu.nfe and (gpu.x.cpu() - cpu.x).abs().max().item() < 1e-9


def _syncs(fn) -> int:
    """The synchronizing CUDA operations ``fn()`` makes (``torch.cuda.set_sync_debug_mode``)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("solver", ["euler", "heun", "ddim", "unipc"])
@pytest.mark.parametrize("sde", [VPSDE(), VPSDE.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64)), VESDE()],
                         ids=["vp", "vp_discrete", "ve"])
def test_fixed_step_sampling_makes_no_host_sync_per_step(sde, solver):
    """As many host syncs at 20 steps as at 5 (the grid's checks and the final non-finite check),
    with a score that makes none itself. A discrete schedule once indexed its knots with a 0-d
    tensor, a sync at every evaluation."""
    x = draws(sde).to(CUDA)

    def run(steps):
        return lambda: sample_ode(lambda y, t: -y, sde, x, steps=steps, solver=solver)

    run(5)()  # warm-up: caches of the schedule's knots on the device, the multistep coefficients
    run(20)()
    few = _syncs(run(5))
    assert few >= 1  # the final check is seen, so the count is not vacuous
    assert _syncs(run(20)) == few


@pytest.mark.parametrize("solver", ["euler_maruyama", "ancestral", "sde_dpmpp_2m", "srk"])
def test_sample_sde_on_cuda_with_a_cuda_generator(solver):
    sde = VPSDE()
    score = mixture().score_fn(sde)
    x = draws(sde).to(CUDA)
    runs = [sample_sde(score, sde, x, steps=20, solver=solver, generator=torch.Generator(CUDA).manual_seed(1))
            for _ in range(2)]
    assert runs[0].x.device.type == "cuda" and torch.equal(runs[0].x, runs[1].x)
    assert bool(torch.isfinite(runs[0].x).all())


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_log_likelihood_on_cuda_matches_cpu(divergence):
    sde, gm = VPSDE(), mixture()
    x = gm.sample(32, generator=torch.Generator().manual_seed(2), dtype=F64)
    kw = dict(divergence=divergence, probes=4)
    cpu = log_likelihood(gm.score_fn(sde), sde, x, generator=torch.Generator().manual_seed(3), **kw)
    gpu = log_likelihood(gm.score_fn(sde), sde, x.to(CUDA), generator=torch.Generator(CUDA).manual_seed(3), **kw)
    assert gpu.logp.device.type == "cuda"
    if divergence == "exact":
        assert (gpu.logp.cpu() - cpu.logp).abs().max().item() < 1e-6
    exact = gm.marginal_log_prob(sde, x, 1e-5)
    assert (gpu.logp.cpu() - exact).abs().mean().item() < (1e-2 if divergence == "exact" else 1.0)


def test_compiled_ode_sampler_as_a_cuda_graph():
    sde = VPSDE()
    score = mixture().score_fn(sde)
    sampler = CompiledODESampler(score, sde, steps=8)  # mode "auto": reduce-overhead (CUDA graphs)
    outs = []

    def calls():  # warm-up, recording, then replays; every output must survive the later replays
        for seed in range(5):
            x = sde.prior_sample((64, 2), generator=torch.Generator().manual_seed(seed), dtype=F64).to(CUDA)
            outs.append((sampler(x).x, sample_ode(score, sde, x, steps=8).x))

    assert graphs_compiled_by(calls) == 1
    for got, ref in outs:
        assert (got - ref).abs().max().item() < 1e-10


def test_compiled_sde_sampler_as_a_cuda_graph():
    sde = VPSDE()
    score = mixture().score_fn(sde)
    sampler = CompiledSDESampler(score, sde, steps=8, solver="ancestral")
    outs = []

    def calls():  # new x and new noise each time: both are copied into the graph's static inputs
        for seed in range(5):
            gen = torch.Generator(CUDA).manual_seed(seed)
            x = torch.randn((64, 2), generator=gen, dtype=F64, device=CUDA)
            noise = torch.randn((8, 64, 2), generator=gen, dtype=F64, device=CUDA)
            draws = iter(noise)
            ref = sample_sde(score, sde, x, steps=8, solver="ancestral",
                             brownian=lambda t0, t1: next(draws) * (t1 - t0).abs().sqrt())
            outs.append((sampler(x, noise=noise).x, ref.x))

    assert graphs_compiled_by(calls) == 1
    for got, ref in outs:
        assert (got - ref).abs().max().item() < 1e-10
