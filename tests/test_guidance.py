"""Classifier and classifier-free guidance, proven on a class-conditional Gaussian mixture.

The mixture's components carry labels, so the noisy classifier ``p_t(y | x)`` and the
conditional score ``grad log p_t(x | y)`` are exact at every ``t``: guidance with the exact
classifier at ``w = 1`` must reproduce the conditional score to round-off, CFG must equal the
guided score it stands for, and samples must follow ``p(x | y)``.
"""

import math

import pytest
import torch

import sdediff as sd
from mixture_checks import Allowance, assert_matches_mixture

# Two classes: class 0 has two modes on top, class 1 one mode below.
GM = sd.GaussianMixture([0.3, 0.3, 0.4], [[-1.5, 1.0], [1.5, 1.0], [0.0, -1.2]], [0.35, 0.35, 0.45], labels=[0, 0, 1])
NULL = -1  # the test bed's null condition: the unconditional score


def noisy_batch(sde, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = GM.sample(n, generator=g)
    t = torch.linspace(0.02, sde.T, n, dtype=torch.float64)
    xt = sde.perturb(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    y = torch.arange(n) % 2
    return xt, t, y


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_test_bed_conditional_score_and_classifier_are_bayes(sde):
    xt, t, y = noisy_batch(sde)
    score = GM.conditional_score_fn(sde)(xt, t, y)
    for c in (0, 1):
        rows = y == c
        by_hand = GM.conditional(c).marginal_score(sde, xt[rows], t[rows])  # a mixture of class c's components only
        assert rel(score[rows], by_hand) < 1e-12
    prior = torch.tensor([0.6, 0.4], dtype=torch.float64).log()
    bayes = torch.stack([GM.conditional(c).marginal_log_prob(sde, xt, t) + prior[c] for c in (0, 1)], 1)
    bayes = bayes - GM.marginal_log_prob(sde, xt, t)[:, None]
    assert torch.allclose(GM.class_log_prob(sde, xt, t), bayes, rtol=0, atol=1e-12)
    assert torch.allclose(GM.classifier(sde)(xt, t, y), bayes.gather(1, y[:, None])[:, 0], rtol=0, atol=1e-12)
    assert rel(GM.conditional_score_fn(sde)(xt, t, torch.full_like(y, NULL)), GM.marginal_score(sde, xt, t)) < 1e-14


def test_classifier_guidance_at_scale_one_is_the_conditional_score(sde):
    xt, t, y = noisy_batch(sde)
    guided = sd.classifier_guidance(GM.score_fn(sde), GM.classifier(sde), y, 1.0)
    exact = GM.conditional_score_fn(sde)(xt, t, y)
    assert rel(guided(xt, t), exact) < 1e-12
    with torch.no_grad():  # the sampling loops run without autograd; torch.func.grad does not need it
        assert rel(guided(xt, t), exact) < 1e-12
    # A classifier returning logits (batch, classes): log-probabilities are logits too.
    logits = sd.classifier_guidance(GM.score_fn(sde), lambda x, t, y: GM.class_log_prob(sde, x, t), y, 1.0)
    assert rel(logits(xt, t), exact) < 1e-12


def test_guidance_scales_the_classifier_gradient_per_sample():
    sde = sd.VPSDE()
    xt, t, y = noisy_batch(sde)
    s_u = GM.score_fn(sde)(xt, t)
    grad = GM.conditional_score_fn(sde)(xt, t, y) - s_u  # = grad log p_t(y | x) by Bayes
    w = torch.linspace(-1.0, 4.0, xt.shape[0], dtype=torch.float64)
    guided = sd.classifier_guidance(GM.score_fn(sde), GM.classifier(sde), y, w)(xt, t)
    assert rel(guided, s_u + w[:, None] * grad) < 1e-12
    assert rel(sd.classifier_guidance(GM.score_fn(sde), GM.classifier(sde), y, 0.0)(xt, t), s_u) == 0.0


@pytest.mark.parametrize("w", [0.0, 0.5, 3.0])
def test_cfg_with_exact_scores_is_the_guided_score(sde, w):
    """(1 + w) s(x|y) - w s(x) = s(x) + (1 + w) grad log p(y|x): CFG is classifier guidance at scale 1 + w."""
    xt, t, y = noisy_batch(sde)
    cond = GM.conditional_score_fn(sde)
    cfg = sd.classifier_free_guidance(lambda x, t: cond(x, t, y), GM.score_fn(sde), w)
    reference = sd.classifier_guidance(GM.score_fn(sde), GM.classifier(sde), y, 1.0 + w)
    assert rel(cfg(xt, t), reference(xt, t)) < 1e-11


class CountingNet:
    """A conditional network ``net(x, t, y)`` predicting ``prediction`` from the exact conditional score."""

    def __init__(self, sde, prediction):
        self.sde, self.prediction, self.calls, self.batches = sde, prediction, 0, []

    def __call__(self, x, t, y):
        self.calls += 1
        self.batches.append(x.shape[0])
        alpha, sigma = (c[:, None] for c in self.sde.marginal(t))
        score = GM.conditional_score_fn(self.sde)(x, t, y)
        eps = -sigma * score
        x0 = (x + sigma**2 * score) / alpha
        return {"score": score, "eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[self.prediction]


@pytest.mark.parametrize("prediction", ["score", "eps", "x0", "v"])
def test_cfg_one_batched_call_through_the_adapters(prediction):
    sde = sd.VPSDE(schedule="cosine")
    xt, t, y = noisy_batch(sde)
    w = 2.0
    exact = sd.classifier_guidance(GM.score_fn(sde), GM.classifier(sde), y, 1.0 + w)(xt, t)
    net = CountingNet(sde, prediction)
    guided = sd.classifier_free_guidance(sd.as_score_fn(net, sde, prediction), scale=w, y=y, null=NULL)
    assert rel(guided(xt, t), exact) < 1e-10
    assert net.calls == 1 and net.batches == [2 * xt.shape[0]]
    unbatched = sd.classifier_free_guidance(sd.as_score_fn(net, sde, prediction), scale=w, y=y, null=NULL,
                                            batched=False)
    assert rel(unbatched(xt, t), exact) < 1e-10 and net.calls == 3
    # Guiding the network output itself (diffusers: out_u + s (out_c - out_u), s = 1 + w) is the same.
    def guided_output(x, t):
        return (1.0 + w) * net(x, t, y) - w * net(x, t, torch.full_like(y, NULL))
    assert rel(sd.as_score_fn(guided_output, sde, prediction)(xt, t), exact) < 1e-10
    # One condition for the whole batch.
    single = sd.classifier_free_guidance(sd.as_score_fn(net, sde, prediction), scale=w, y=torch.tensor([1]), null=NULL)
    ones = torch.ones_like(y)
    assert rel(single(xt, t), sd.classifier_guidance(GM.score_fn(sde), GM.classifier(sde), ones, 1.0 + w)(xt, t)) < 1e-10


def test_guided_scores_run_in_every_sampler_and_in_the_likelihood():
    sde = sd.VPSDE()
    n = 6
    y = torch.arange(n) % 2
    guided = sd.classifier_guidance(GM.score_fn(sde), GM.classifier(sde), y, 1.0)
    g = torch.Generator().manual_seed(0)
    for run in (lambda: sd.sample_ode(guided, sde, (n, 2), steps=5, dtype=torch.float64, generator=g),
                lambda: sd.sample_sde(guided, sde, (n, 2), steps=5, dtype=torch.float64, generator=g),
                lambda: sd.sample_ddim(guided, sde, (n, 2), steps=5, dtype=torch.float64, generator=g),
                lambda: sd.sample_pc(guided, sde, (n, 2), steps=5, dtype=torch.float64, generator=g)):
        sol = run()
        assert sol.nfe > 0 and bool(torch.isfinite(sol.x).all())
    # The exact divergence differentiates through torch.func.grad: log p(x | y) in closed form.
    x = torch.cat([GM.conditional(c).sample(n // 2, generator=g) for c in (0, 1)])
    y = torch.tensor([0] * (n // 2) + [1] * (n // 2))
    guided = sd.classifier_guidance(GM.score_fn(sde), GM.classifier(sde), y, 1.0)
    t_start = 1e-3
    result = sd.log_likelihood(guided, sde, x, t_start=t_start, rtol=1e-7, atol=1e-7)
    by_class = [GM.conditional(c) for c in (0, 1)]
    ts, T = torch.full((n,), t_start, dtype=torch.float64), torch.full((n,), sde.T, dtype=torch.float64)
    exact = torch.cat([by_class[c].marginal_log_prob(sde, x[y == c], ts[y == c]) for c in (0, 1)])
    # The ODE maps log p_T(z) to log p_{t_start}(x); correct for the N(0, I) prior standing in for p_T(z | y).
    z = result.z
    prior_gap = torch.cat([by_class[c].marginal_log_prob(sde, z[y == c], T[y == c]) for c in (0, 1)]) - sde.prior_logp(z)
    assert ((result.logp + prior_gap - exact).abs() / 2).max() < 2e-4
    assert ((result.logp - exact).abs() / 2).max() > 1e-3  # without it (means alpha(T) mu ~ 1e-2 off zero)


def sample_guided(scale, n=3000, seed=0, steps=60):
    sde = sd.VPSDE()
    y = torch.zeros(n, dtype=torch.long)
    guided = sd.classifier_guidance(GM.score_fn(sde), GM.classifier(sde), y, scale)
    return sd.sample_ode(guided, sde, (n, 2), steps=steps, solver="dpmpp_2m", t_end=1e-4, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(seed)).x


def test_guidance_at_scale_one_samples_the_conditional_distribution():
    x = sample_guided(1.0)
    # The ODE's pathwise error at 60 steps and t_end's noise are below the sampling error here.
    assert_matches_mixture(x, GM.conditional(0), z=4.5, allow=Allowance(var=0.03))
    # The same with classifier-free guidance at w = 0 from one conditional network (per-sample labels).
    sde = sd.VPSDE()
    y = torch.tensor([0, 1]).repeat(1500)
    cfg = sd.classifier_free_guidance(GM.conditional_score_fn(sde), scale=0.0, y=y, null=NULL)
    x = sd.sample_ode(cfg, sde, (3000, 2), steps=60, solver="dpmpp_2m", t_end=1e-4, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(1)).x
    assert_matches_mixture(x[y == 0], GM.conditional(0), z=4.5, allow=Allowance(var=0.03))
    lower = x[y == 1]
    assert abs(lower.mean(0) - GM.conditional(1).mean()).max() < 4.5 * 0.45 / math.sqrt(1500)


def test_larger_guidance_scale_concentrates_samples():
    """p(x) p(y|x)^w: at w > 1 the samples of class 0 (above) move away from class 1 (below) and spread less."""
    height, spread = [], []
    for scale in (1.0, 3.0, 8.0):
        upper = sample_guided(scale, n=2000)[:, 1]
        height.append((upper.mean().item(), upper.std().item() / math.sqrt(len(upper))))
        spread.append(upper.var().item())
    # Measured: mean height 0.986, 1.277, 1.630 (class 0's modes sit at 1.0); variance 0.120, 0.059, 0.039.
    assert abs(height[0][0] - 1.0) < 4.5 * height[0][1]
    for (a, sa), (b, sb) in zip(height, height[1:]):
        assert b - a > 10 * math.hypot(sa, sb)
    assert spread[0] > 1.3 * spread[1] > 1.3**2 * spread[2]


def test_drop_condition():
    g = torch.Generator().manual_seed(0)
    n, p = 20000, 0.2
    y = torch.randint(0, 10, (n,), generator=g)
    dropped = sd.drop_condition(y, 10, p, generator=g)
    is_null = dropped == 10
    assert abs(is_null.double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(dropped[~is_null], y[~is_null])
    emb = torch.randn(n, 3, generator=g)
    null = torch.zeros(3)
    out = sd.drop_condition(emb, null, p, generator=torch.Generator().manual_seed(5))
    rows = (out == 0).all(1)
    assert torch.equal(out[~rows], emb[~rows]) and abs(rows.double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(sd.drop_condition(y, 10, 0.0), y) and bool((sd.drop_condition(y, 10, 1.0) == 10).all())


def test_guidance_input_validation():
    sde = sd.VPSDE()
    s, c = GM.score_fn(sde), GM.classifier(sde)
    y = torch.zeros(4, dtype=torch.long)
    x, t = torch.zeros(4, 2, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    with pytest.raises(TypeError, match="score_fn"):
        sd.classifier_guidance(None, c, y)
    with pytest.raises(TypeError, match="classifier_log_prob"):
        sd.classifier_guidance(s, "clf", y)
    with pytest.raises(ValueError, match="scale"):
        sd.classifier_guidance(s, c, y, float("nan"))
    with pytest.raises(ValueError, match="scale"):
        sd.classifier_guidance(s, c, y, torch.ones(2, 2))
    with pytest.raises(ValueError, match="scale has 3 entries"):
        sd.classifier_guidance(s, c, y, torch.ones(3))(x, t)
    with pytest.raises(ValueError, match="classifier_log_prob must return"):
        sd.classifier_guidance(s, lambda x, t, y: x.sum(), y)(x, t)
    cond = GM.conditional_score_fn(sde)
    with pytest.raises(ValueError, match="not both"):
        sd.classifier_free_guidance(cond, s, 1.0, y=y, null=NULL)
    with pytest.raises(ValueError, match="give y and null"):
        sd.classifier_free_guidance(cond, scale=1.0)
    with pytest.raises(ValueError, match="y has 3 conditions"):
        sd.classifier_free_guidance(cond, scale=1.0, y=torch.zeros(3, dtype=torch.long), null=NULL)(x, t)
    with pytest.raises(ValueError, match=r"p must be in \[0.0, 1.0\]"):
        sd.drop_condition(y, NULL, 1.5)
    with pytest.raises(TypeError, match="y must be a tensor"):
        sd.drop_condition(3, NULL, 0.5)
    with pytest.raises(ValueError, match="no class labels"):
        sd.GaussianMixture([1.0], [[0.0, 0.0]], 1.0).classifier(sde)(x, t, y)
    with pytest.raises(ValueError, match="labels must be"):
        sd.GaussianMixture([1.0], [[0.0, 0.0]], 1.0, labels=[0.5])
