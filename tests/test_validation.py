"""Bad input to the sampling API raises TypeError/ValueError naming the argument and the accepted range."""

import pytest
import torch

import sdediff as sd

SDE = sd.VPSDE()
SCORE = sd.GaussianMixture([1.0], [[0.0, 0.0]], [1.0]).score_fn(SDE)
X = torch.zeros(4, 2)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(steps=0), ValueError, r"steps must be an int >= 1, got 0"),
        (dict(steps=-3), ValueError, r"steps must be an int >= 1"),
        (dict(steps=2.5), TypeError, r"steps must be an int >= 1, got float"),
        (dict(t_end=0.0), ValueError, r"t_end must be in \(0.0, 1.0\), got 0.0"),
        (dict(t_end=1.0), ValueError, r"t_end must be in \(0.0, 1.0\)"),
        (dict(t_end=float("nan")), ValueError, r"t_end must be finite"),
        (dict(t_start=1.5), ValueError, r"t_start must be in \(0.0, 1.0\], got 1.5"),
        (dict(t_start=0.5, t_end=0.6), ValueError, r"t_end must be in \(0.0, 0.5\), got 0.6"),
        (dict(grid="cosine"), ValueError, r"grid must be one of .*uniform.*log_snr.*karras.*quadratic"),
        (dict(grid=torch.tensor([1.0, 0.5, 0.7])), ValueError, r"grid must be strictly monotone"),
        (dict(grid=torch.tensor([1.0, 0.5, 0.0])), ValueError, r"grid must end at a time t_end > 0"),
        (dict(grid=torch.tensor([1.5, 0.5])), ValueError, r"grid must lie in \[0, 1\], got 1.5"),
        (dict(grid=torch.tensor([1.0, 0.5]), steps=3), ValueError, r"steps=3 disagrees with the grid of 2 times"),
        (dict(grid=torch.tensor([1.0, 0.5]), t_end=0.1), ValueError, r"t_start and t_end are set by the grid"),
        (dict(grid=torch.tensor([1, 0])), TypeError, r"grid must have a floating-point dtype"),
        (dict(solver="rk5"), ValueError, r"unknown solver 'rk5'; valid ODE solvers: .*euler.*heun.*rk4"),
        (dict(solver="euler_maruyama"), ValueError, r"solver 'euler_maruyama' is an SDE solver; expected one of: .*heun"),
        (dict(solver=3), TypeError, r"solver must be a name or a sdediff Solver instance"),
        (dict(solver="dopri5", rtol=0.0), ValueError, r"rtol must be in \(0.0, inf\]"),
        (dict(solver="dopri5", atol=-1.0), ValueError, r"atol must be in \(0.0, inf\]"),
    ],
)
def test_sample_ode_rejects(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        sd.sample_ode(SCORE, SDE, X, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(stochasticity=-0.1), ValueError, r"stochasticity must be in \[0.0, inf\], got -0.1"),
        (dict(stochasticity="1"), TypeError, r"stochasticity must be a real number"),
        (dict(solver="heun"), ValueError, r"solver 'heun' is an ODE solver; expected one of: .*euler_maruyama"),
        (dict(brownian=42), TypeError, r"brownian must be callable"),
        (dict(solver="srk", brownian=lambda t0, t1: None), TypeError, r"'srk' needs a torchsde Brownian motion"),
        (dict(steps=0), ValueError, r"steps must be an int >= 1"),
    ],
)
def test_sample_sde_rejects(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        sd.sample_sde(SCORE, SDE, X, **kwargs)


@pytest.mark.parametrize("sampler", [sd.sample_ode, sd.sample_sde])
def test_samplers_reject_bad_model_process_and_state(sampler):
    with pytest.raises(TypeError, match=r"score_fn must be callable, got Tensor"):
        sampler(X, SDE, X)
    with pytest.raises(TypeError, match=r"sde must be an sdediff SDE .*got str"):
        sampler(SCORE, "vp", X)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got ndarray"):
        sampler(SCORE, SDE, X.numpy())
    with pytest.raises(TypeError, match=r"x must have a floating-point dtype, got torch.int64"):
        sampler(SCORE, SDE, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, \*dims\) with batch >= 1"):
        sampler(SCORE, SDE, torch.zeros(0, 2))
    with pytest.raises(ValueError, match=r"shape must be a tuple of positive ints"):
        sampler(SCORE, SDE, (4, 0))


def test_integrate_rejects_bad_terms_and_grids():
    term = sd.ODETerm(lambda x, t: -x)
    with pytest.raises(TypeError, match=r"term must be an ODETerm or SDETerm, got function"):
        sd.integrate(lambda x, t: x, X, torch.tensor([0.0, 1.0]), solver="euler")
    with pytest.raises(ValueError, match=r"time grid must be 1-D with at least 2 times"):
        sd.integrate(term, X, torch.tensor([0.0]), solver="euler")
    with pytest.raises(ValueError, match=r"time grid must be finite and strictly monotone"):
        sd.integrate(term, X, torch.tensor([0.0, 1.0, 1.0]), solver="euler")
    with pytest.raises(ValueError, match=r"is an SDE solver"):
        sd.integrate(term, X, torch.tensor([0.0, 1.0]), solver="milstein")
    sde_term = sd.SDETerm(lambda x, t: -x, lambda x, t: torch.ones_like(x))
    with pytest.raises(ValueError, match=r"'reversible_heun' solves Stratonovich SDEs; .*only for additive noise"):
        sd.integrate(sde_term, X, torch.tensor([0.0, 1.0]), solver="reversible_heun")


def test_register_solver_rejects_non_solvers():
    with pytest.raises(TypeError, match=r"solver must be a sdediff Solver"):
        sd.register_solver(object())

    class Nameless(sd.ODESolver):
        pass

    with pytest.raises(ValueError, match=r"needs a non-empty name"):
        sd.register_solver(Nameless)
    with pytest.raises(ValueError, match=r"kind must be None, 'ode' or 'sde'"):
        sd.available_solvers("pde")

    class Impostor(sd.ODESolver):
        name = "heun"

    with pytest.raises(ValueError, match=r"a solver named 'heun' is registered already; pass overwrite=True"):
        sd.register_solver(Impostor)
    assert type(sd.get_solver("heun", "ode")).__name__ == "Heun"


def test_reverse_and_adapters_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"stochasticity must be in \[0.0, inf\]"):
        SDE.reverse(SCORE, stochasticity=-1.0)
    with pytest.raises(TypeError, match=r"score_fn must be callable"):
        SDE.probability_flow(None)
    with pytest.raises(ValueError, match=r"sde_type must be 'ito' or 'stratonovich'"):
        sd.ReverseProcess(SDE, SCORE, sde_type="ito2")
