"""Shared fixtures: the six forward-SDE variants every SDE-level test runs over."""

import pytest
import torch
from torch._dynamo.utils import counters

from sdediff import EDMSDE, SubVPSDE, VESDE, VPSDE

# The tests run small tensors, where intra-op threads cost more than they give (and on a loaded
# 2-core machine, far more).
torch.set_num_threads(1)


def ddpm_linear_betas(n: int = 1000) -> torch.Tensor:
    """The betas of Ho et al.'s n-step linear DDPM schedule (1e-4 .. 0.02 for n = 1000), float64."""
    return torch.linspace(0.1 / n, 20.0 / n, n, dtype=torch.float64)


SDE_FACTORIES = {
    "vp_linear": lambda: VPSDE(),
    "vp_cosine": lambda: VPSDE(schedule="cosine"),
    "vp_discrete": lambda: VPSDE.from_betas(ddpm_linear_betas(1000)),
    "subvp_linear": lambda: SubVPSDE(),
    "subvp_cosine": lambda: SubVPSDE(schedule="cosine"),
    "ve": lambda: VESDE(),
    "edm": lambda: EDMSDE(),
}


@pytest.fixture(params=list(SDE_FACTORIES))
def sde_name(request):
    return request.param


@pytest.fixture
def sde(sde_name):
    return SDE_FACTORIES[sde_name]()


@pytest.fixture
def ddpm_betas():
    return ddpm_linear_betas(1000)


def graphs_compiled_by(fn) -> int:
    """How many graphs dynamo compiles while ``fn()`` runs (a second compile of one program is a bug)."""
    before = counters["stats"]["unique_graphs"]
    fn()
    return counters["stats"]["unique_graphs"] - before
