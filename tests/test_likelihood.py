"""Log-likelihoods along the probability-flow ODE against the test bed's closed-form densities."""

import math

import pytest
import torch

import sdediff as sd
from sdediff.likelihood import _divergence_field, bits_per_dim, decode, encode, log_likelihood

F64 = torch.float64
T_START = 1e-5


def mixture(d, seed=0, scale=1.0):
    """Three components with random means, centred (weighted mean 0), as data normalized for training are.

    Centring matters for the raw log-likelihood: ``p_T`` is the mixture shrunk by ``alpha(T)``, and its
    mismatch with the N(0, I) prior is first order in ``alpha(T) * mean`` (3.3e-3 nats/dim for VP in
    2-D uncentred, 2e-5 centred).
    """
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    means = torch.randn(3, d, generator=g, dtype=F64) * scale
    means = means - (weights[:, None] * means).sum(0)
    return sd.GaussianMixture(weights, means, torch.tensor([0.3, 0.5, 0.4], dtype=F64))


SDES = {"vp": sd.VPSDE(), "subvp": sd.SubVPSDE(), "ve": sd.VESDE(sigma_min=0.01, sigma_max=50.0)}


def prior_gap(gm, sde, z):
    """``log p_T(z) - log N(z; 0, prior_std^2)``: what the prior's mismatch with the true marginal at T adds."""
    return gm.marginal_log_prob(sde, z, sde.T) - sde.prior_logp(z)


@pytest.mark.parametrize("d", [2, 64])
@pytest.mark.parametrize("name", list(SDES))
def test_exact_divergence_matches_the_closed_form(name, d):
    """logp = log p_T(z) + int div f. With the true log p_T(z) in place of the prior, the ODE's part is
    checked: measured max error 6e-5 .. 5.2e-4 nats/dim at rtol = atol = 1e-5 (bound 1e-3) and
    <= 8.2e-8 at 1e-8 (bound 1e-6). The value as returned (N(0, I) prior) also carries the prior's
    mismatch with the true marginal at T: measured mean error 2.3e-5 .. 3.7e-4 nats/dim (the largest
    VE in 2-D, whose prior N(0, 50^2 I) ignores the data's spread), asserted below 1e-3 everywhere."""
    sde, gm = SDES[name], mixture(d)
    x = gm.sample(8 if d == 64 else 32, generator=torch.Generator().manual_seed(1), dtype=F64)
    exact = gm.marginal_log_prob(sde, x, T_START)
    for tol, bound in ((1e-5, 1e-3), (1e-8, 1e-6)):
        res = log_likelihood(gm.score_fn(sde), sde, x, t_start=T_START, rtol=tol, atol=tol)
        assert ((res.logp + prior_gap(gm, sde, res.z) - exact).abs().max() / d) < bound, tol
        assert ((res.logp - exact).abs().mean() / d) < 1e-3, tol  # as returned, at either tolerance
    assert res.stderr is None and res.z.shape == x.shape and res.nfe > 0


def test_converges_to_the_data_density_as_t_start_shrinks():
    """|log p_{t_start}(x) - log p_0(x)| falls about linearly in t_start (sigma^2 ~ beta_min t)."""
    sde, gm = SDES["vp"], mixture(2)
    x = gm.sample(32, generator=torch.Generator().manual_seed(2), dtype=F64)
    gaps = []
    for t in (1e-2, 1e-3, 1e-4):
        res = log_likelihood(gm.score_fn(sde), sde, x, t_start=t, rtol=1e-8, atol=1e-8)
        gaps.append((res.logp + prior_gap(gm, sde, res.z) - gm.log_prob(x)).abs().mean().item())
    assert gaps[0] > 5 * gaps[1] > 25 * gaps[2], gaps


def test_hutchinson_is_unbiased_and_its_stderr_is_honest():
    """Against the exact-divergence ODE value (same tolerance): the z-scores of 64-probe estimates have
    mean ~0 and spread ~1 (measured -0.23 and 0.96 over 50 samples)."""
    sde, gm = SDES["vp"], mixture(2)
    x = gm.sample(50, generator=torch.Generator().manual_seed(3), dtype=F64)
    exact = log_likelihood(gm.score_fn(sde), sde, x, rtol=1e-8, atol=1e-8).logp
    for noise in ("rademacher", "gaussian"):
        est = log_likelihood(gm.score_fn(sde), sde, x, divergence="hutchinson", probes=64, noise=noise,
                             generator=torch.Generator().manual_seed(4), rtol=1e-8, atol=1e-8)
        z = (est.logp - exact) / est.stderr
        assert abs(z.mean().item()) < 3 / math.sqrt(len(z)) * 1.5 and 0.7 < z.std().item() < 1.3, (noise, z)
    few = log_likelihood(gm.score_fn(sde), sde, x, divergence="hutchinson", probes=4, noise="gaussian",
                         generator=torch.Generator().manual_seed(4), rtol=1e-8, atol=1e-8)
    assert few.stderr.mean() > 2 * est.stderr.mean()  # ~ 1 / sqrt(K): 4 vs 64 probes, ratio ~4


@pytest.mark.parametrize("chunk_size", [1, 2, 3])  # a loop; vmap over chunks, even and uneven
def test_exact_divergence_is_the_jacobian_trace_of_a_network(chunk_size):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()

    def score_fn(x, t):
        return net(torch.cat([x, t[:, None]], 1))

    sde = SDES["vp"]
    x = torch.randn(5, 3, dtype=F64)
    t = torch.tensor(0.3, dtype=F64)
    field = _divergence_field(sde, score_fn, x.shape, "exact", None, chunk_size=chunk_size)
    state = torch.cat([x, torch.zeros(5, 1, dtype=F64)], 1)
    div = field(state, t)[:, -1]
    with torch.no_grad():  # the divergence takes its own gradients: evaluation may run under no_grad
        assert torch.equal(field(state, t)[:, -1], div)
    f, g2 = sde._drift_coef(t), sde._g2(t)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda y: score_fn(y[None], t.expand(1))[0], x[i])
        assert torch.allclose(div[i], 3 * f - 0.5 * g2 * torch.trace(jac), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(SDES))
def test_encode_decode_round_trip(name):
    sde, gm = SDES[name], mixture(2)
    x = gm.sample(16, generator=torch.Generator().manual_seed(5), dtype=F64)
    z = encode(gm.score_fn(sde), sde, x, rtol=1e-8, atol=1e-8)
    assert torch.allclose(z, log_likelihood(gm.score_fn(sde), sde, x, rtol=1e-8, atol=1e-8).z, atol=1e-5)
    back = decode(gm.score_fn(sde), sde, z, rtol=1e-8, atol=1e-8)
    assert (back - x).abs().max() < 1e-5, (back - x).abs().max()


def test_bits_per_dim_of_a_wide_gaussian():
    """Data N(0, s^2 I) on 256 bins of [-1, 1] (s = 0.4, wide against the bin width 1/128): E_u[log p(y)]
    over a bin [a, a + w] is closed-form, -1/2 log(2 pi s^2) - (c^2 + w^2/12) / (2 s^2) with c the bin centre."""
    s, d = 0.4, 2
    gm = sd.GaussianMixture(torch.ones(1, dtype=F64), torch.zeros(1, d, dtype=F64), torch.tensor([s], dtype=F64))
    sde = SDES["vp"]
    k = torch.tensor([[100.0, 140.0], [128.0, 77.0], [200.0, 30.0]], dtype=F64)
    x = -1.0 + k * 2.0 / 255.0
    w = 2.0 / 256
    centre = -1.0 + (k + 0.5) * w
    expected_logp = (-0.5 * math.log(2 * math.pi * s**2) - (centre**2 + w**2 / 12) / (2 * s**2)).sum(1)
    expected = -(expected_logp + d * math.log(w)) / (d * math.log(2.0))
    got = bits_per_dim(gm.score_fn(sde), sde, x, dequantizations=64, generator=torch.Generator().manual_seed(6),
                       t_start=1e-6, rtol=1e-7, atol=1e-7)
    # dequantization noise: std of log p over a bin ~ |c| w / s^2 / sqrt(12), averaged over 64 draws
    assert (got - expected).abs().max() < 5e-3, (got, expected)
    assert 5.5 < expected.mean() < 8.5  # a sanity scale: 8-bit data of this spread


def test_fixed_step_solvers_and_validation():
    sde, gm = SDES["vp"], mixture(2)
    x = gm.sample(8, generator=torch.Generator().manual_seed(7), dtype=F64)
    exact = log_likelihood(gm.score_fn(sde), sde, x, rtol=1e-8, atol=1e-8).logp
    rk4 = log_likelihood(gm.score_fn(sde), sde, x, solver="rk4", steps=200)
    assert rk4.nfe == 800 and (rk4.logp - exact).abs().max() < 1e-3
    with pytest.raises(ValueError, match="divergence must be one of"):
        log_likelihood(gm.score_fn(sde), sde, x, divergence="trace")
    with pytest.raises(ValueError, match="noise must be one of"):
        log_likelihood(gm.score_fn(sde), sde, x, divergence="hutchinson", noise="uniform")
    with pytest.raises(ValueError, match="t_start"):
        log_likelihood(gm.score_fn(sde), sde, x, t_start=0.0)
    with pytest.raises(ValueError, match="probes"):
        log_likelihood(gm.score_fn(sde), sde, x, divergence="hutchinson", probes=0)
    with pytest.raises(ValueError, match="high must exceed low"):
        bits_per_dim(gm.score_fn(sde), sde, x, low=1.0, high=-1.0)


EVAL_SCRIPT = """
import json, sys, torch, torch.distributed as dist
import sdediff as sd
torch.set_num_threads(1)
dist.init_process_group("gloo")
gm = sd.GaussianMixture(torch.tensor([0.3, 0.7], dtype=torch.float64),
                        torch.tensor([[-0.5, 0.0], [0.5, 0.25]], dtype=torch.float64),
                        torch.tensor([0.3, 0.4], dtype=torch.float64))
sde = sd.VPSDE()
k = torch.randint(0, 256, (10, 2), generator=torch.Generator().manual_seed(0)).double()
loader = [(-1.0 + k[i:i + 3] * 2.0 / 255.0, None) for i in range(0, 10, 3)]   # 4 batches: 3, 3, 3, 1
res = sd.evaluate(gm.score_fn(sde), sde, loader, progress=False)
if dist.get_rank() == 0:
    json.dump({"mean": res.mean, "stderr": res.stderr, "count": res.count, "world": dist.get_world_size()},
              open(sys.argv[1], "w"))
dist.barrier()  # both ranks done before the teardown: without it, gloo sometimes aborted a rank at exit
dist.destroy_process_group()
"""


def _eval_data():
    gm = sd.GaussianMixture(torch.tensor([0.3, 0.7], dtype=F64), torch.tensor([[-0.5, 0.0], [0.5, 0.25]], dtype=F64),
                            torch.tensor([0.3, 0.4], dtype=F64))
    k = torch.randint(0, 256, (10, 2), generator=torch.Generator().manual_seed(0)).double()
    return gm, [(-1.0 + k[i:i + 3] * 2.0 / 255.0, None) for i in range(0, 10, 3)]


def test_evaluate_single_process_is_the_mean_of_bits_per_dim():
    gm, loader = _eval_data()
    sde = SDES["vp"]
    res = sd.evaluate(gm.score_fn(sde), sde, loader, progress=False)
    per_sample = torch.cat([bits_per_dim(gm.score_fn(sde), sde, x, generator=torch.Generator().manual_seed(i))
                            for i, (x, _) in enumerate(loader)])
    assert res.count == 10
    assert math.isclose(res.mean, per_sample.mean().item(), rel_tol=1e-12)
    assert math.isclose(res.stderr, (per_sample.std() / math.sqrt(10)).item(), rel_tol=1e-9)
    with pytest.raises(ValueError, match="no samples"):
        sd.evaluate(gm.score_fn(sde), sde, [], progress=False)


def test_evaluate_with_two_gloo_processes_equals_one(tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU): each process takes every other batch; the all-reduced
    result equals the single-process one (the dequantization of batch i is seeded by i)."""
    import json
    import subprocess
    import sys

    gm, loader = _eval_data()
    sde = SDES["vp"]
    single = sd.evaluate(gm.score_fn(sde), sde, loader, progress=False)
    script, out = tmp_path / "run.py", tmp_path / "out.json"
    script.write_text(EVAL_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    multi = json.loads(out.read_text())
    assert multi["world"] == 2 and multi["count"] == single.count == 10
    assert math.isclose(multi["mean"], single.mean, rel_tol=1e-12)
    assert math.isclose(multi["stderr"], single.stderr, rel_tol=1e-9)
