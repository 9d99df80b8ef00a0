"""Sampling time grids: shapes, end points, monotonicity and each grid's defining formula."""

import numpy as np
import pytest
import torch

from sdediff import VESDE, VPSDE, time_grid

F64 = torch.float64
GRIDS = ["uniform", "log_snr", "karras", "quadratic"]


def _ends(sde, t_start, t_end):
    return (sde.T if t_start is None else t_start), t_end


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("steps,t_start,t_end", [(1, None, 1e-3), (7, None, 1e-3), (50, None, 1e-3), (20, 0.6, 0.05)])
def test_grid_shape_ends_monotone(sde, grid, steps, t_start, t_end):
    ts = time_grid(sde, steps, grid=grid, t_start=t_start, t_end=t_end)
    start, end = _ends(sde, t_start, t_end)
    assert ts.shape == (steps + 1,) and ts.dtype == F64
    assert ts[0].item() == start and ts[-1].item() == end  # exact, not approximately
    assert bool((ts[1:] < ts[:-1]).all())
    ts32 = time_grid(sde, steps, grid=grid, t_start=t_start, t_end=t_end, dtype=torch.float32)
    assert ts32.dtype == torch.float32
    torch.testing.assert_close(ts32, ts.float(), rtol=0, atol=0)


@pytest.mark.parametrize("steps,t_start,t_end", [(10, None, 1e-3), (33, 0.7, 0.01)])
def test_uniform_and_quadratic_formulas(sde, steps, t_start, t_end):
    start, end = _ends(sde, t_start, t_end)
    i = np.arange(steps + 1)
    ts = time_grid(sde, steps, grid="uniform", t_start=t_start, t_end=t_end).numpy()
    np.testing.assert_allclose(ts, start + (end - start) * i / steps, rtol=1e-14, atol=1e-16 * start)
    tq = time_grid(sde, steps, grid="quadratic", t_start=t_start, t_end=t_end).numpy()
    np.testing.assert_allclose(tq, end + (start - end) * (1 - i / steps) ** 2, rtol=1e-14, atol=1e-16 * start)
    # dense near t_end: step sizes shrink monotonically towards the data
    h = -np.diff(tq)
    assert np.all(np.diff(h) < 0)
    assert h[-1] < 0.25 * (start - end) / steps < h[0]


@pytest.mark.parametrize("steps,t_start,t_end", [(10, None, 1e-3), (40, 0.5, 0.02)])
def test_log_snr_grid_is_uniform_in_log_snr(sde, steps, t_start, t_end):
    ts = time_grid(sde, steps, grid="log_snr", t_start=t_start, t_end=t_end)
    lam = sde.log_snr(ts).numpy()
    lam_ref = np.linspace(lam[0], lam[-1], steps + 1)
    # t_from_log_snr is accurate to ~1e-11 relative in t (test_sdes), i.e. ~1e-10 in lambda
    np.testing.assert_allclose(lam, lam_ref, rtol=0, atol=1e-9)
    assert np.all(np.diff(lam) > 0)


@pytest.mark.parametrize("rho", [7.0, 3.0])
@pytest.mark.parametrize("steps,t_start,t_end", [(18, None, 1e-3), (5, 0.8, 0.1)])
def test_karras_grid_matches_edm(sde, rho, steps, t_start, t_end):
    ts = time_grid(sde, steps, grid="karras", t_start=t_start, t_end=t_end, rho=rho)
    alpha, sigma = sde.marginal(ts)
    ratio = (sigma / alpha).numpy()  # the EDM noise level sigma/alpha = exp(-log_snr / 2)
    smax, smin = ratio[0], ratio[-1]
    i = np.arange(steps + 1)
    edm = (smax ** (1 / rho) + i / steps * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    np.testing.assert_allclose(ratio, edm, rtol=1e-9)
    # the end-point noise levels are those of t_start and t_end themselves
    start, end = _ends(sde, t_start, t_end)
    a, s = sde.marginal(torch.tensor([start, end], dtype=F64))
    np.testing.assert_allclose([smax, smin], (s / a).numpy(), rtol=1e-12)


def test_grids_are_distinct(sde):
    grids = {g: time_grid(sde, 10, grid=g) for g in GRIDS}
    for a in GRIDS:
        for b in GRIDS:
            if a < b:
                if isinstance(sde, VESDE) and {a, b} == {"log_snr", "uniform"}:
                    # VE: log_snr(t) = -2 log sigma_min - 2 t log(sigma_max/sigma_min) is affine in t
                    torch.testing.assert_close(grids[a], grids[b], rtol=1e-14, atol=1e-15)
                else:
                    assert (grids[a] - grids[b]).abs().max() > 1e-3, (a, b)


# --- user grids ---------------------------------------------------------------------------------

def test_user_grid_increasing_is_reversed(sde):
    inc = torch.tensor([0.01, 0.2, 0.5, 0.9], dtype=F64) * sde.T
    out = time_grid(sde, None, grid=inc)
    assert torch.equal(out, inc.flip(0))
    assert torch.equal(time_grid(sde, 3, grid=inc.flip(0)), inc.flip(0))
    out32 = time_grid(sde, 3, grid=inc, dtype=torch.float32)
    assert out32.dtype == torch.float32 and torch.equal(out32, inc.flip(0).float())


@pytest.mark.parametrize(
    "values,steps,match",
    [
        ([0.9, 0.5, 0.7, 0.1], None, "grid"),         # not monotone
        ([0.9, 0.5, 0.5, 0.1], None, "grid"),         # not strictly monotone
        ([1.2, 0.5, 0.1], None, "grid"),              # beyond T
        ([0.5, 0.1, -0.1], None, "grid"),             # below 0
        ([[0.9, 0.5], [0.3, 0.1]], None, "grid"),     # 2-D
        ([0.5], None, "grid"),                        # a single time
        ([0.9, 0.5, 0.0], None, "grid"),              # ends at 0
        ([0.0, 0.5, 0.9], None, "grid"),              # increasing, so ends at 0 once reversed
        ([0.9, float("nan"), 0.1], None, "grid"),
        ([0.9, 0.5, 0.1], 3, "steps"),                # 2 steps, not 3
        ([0.9, 0.5, 0.1], 0, "steps"),
    ],
)
def test_user_grid_rejects(sde, values, steps, match):
    with pytest.raises(ValueError, match=match):
        time_grid(sde, steps, grid=sde.T * torch.tensor(values, dtype=F64))  # in units of T


def test_user_grid_type_errors(sde):
    with pytest.raises(TypeError, match="grid"):
        time_grid(sde, None, grid=torch.tensor([3, 2, 1]))
    with pytest.raises(TypeError, match="steps"):
        time_grid(sde, 1.5, grid=torch.tensor([0.9, 0.1], dtype=F64))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=-3), ValueError, "steps"),
        (dict(steps=1.5), TypeError, "steps"),
        (dict(steps=True), TypeError, "steps"),
        (dict(steps=None), TypeError, "steps"),
        (dict(steps=10, grid="foo"), ValueError, "grid"),
        (dict(steps=10, grid=["uniform"]), ValueError, "grid"),
        (dict(steps=10, t_end=0.0), ValueError, "t_end"),
        (dict(steps=10, t_end=0.5, t_start=0.4), ValueError, "t_end"),
        (dict(steps=10, t_end=0.4, t_start=0.4), ValueError, "t_end"),
        (dict(steps=10, t_start=1.5), ValueError, "t_start"),
        (dict(steps=10, t_start=0.0), ValueError, "t_start"),
        (dict(steps=10, rho=0.0), ValueError, "rho"),
    ],
)
def test_time_grid_rejects(sde, kwargs, exc, match):
    kwargs = dict(kwargs)
    steps = kwargs.pop("steps")
    for name in ("t_start", "t_end"):  # in units of T
        if isinstance(kwargs.get(name), float):
            kwargs[name] *= sde.T
    with pytest.raises(exc, match=match):
        time_grid(sde, steps, **kwargs)


def test_time_grid_needs_an_sde():
    with pytest.raises(TypeError, match="sde"):
        time_grid(VPSDE().schedule, 10)
