"""Training a small MLP with each objective reaches the exact score of a 2-D mixture, and samples from it.

Each run trains a 3-layer MLP (128 wide, sinusoidal time features) for 1500 Adam steps of 512
mixture samples, then measures

* the score error ``E_t E_{x_t} sigma(t)^2 ||s_theta - s||^2 / d`` against the exact score,
  ``t ~ U[0.01, 1]`` (the error in eps units; the zero-eps baseline ``sigma^2 ||s||^2 / d`` is 0.82);
* the mode weights of 4000 samples against the mixture's (0.2, 0.3, 0.5).

Thresholds are set at about twice the measured values (stated per test), far below the baseline.
"""

import pytest
import torch

import sdediff as sd
from sdediff import TimeMLP

GM = sd.GaussianMixture([0.2, 0.3, 0.5], [[-1.5, -1.0], [1.5, -1.0], [0.0, 1.2]], [0.25, 0.3, 0.2])
STEPS, BATCH = 1500, 512
BASELINE = 0.82


def train(loss_fn, net, steps=STEPS, lr=3e-3, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        loss = loss_fn(net, GM.sample(BATCH, generator=g, dtype=torch.float32), g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return net.eval()


def score_error(score_fn, sde, n=4000, seed=123):
    g = torch.Generator().manual_seed(seed)
    x0 = GM.sample(n, generator=g, dtype=torch.float32)
    t = 0.01 + (sde.T - 0.01) * torch.rand(n, generator=g)
    xt = sde.perturb(x0, t, torch.randn(x0.shape, generator=g))
    sigma = sde.marginal(t)[1][:, None]
    with torch.no_grad():
        return ((sigma * (score_fn(xt, t) - GM.marginal_score(sde, xt, t))) ** 2).mean().item()


def mode_weights(x):
    labels = GM.component_log_prob(x.double()).argmax(1)
    return torch.bincount(labels, minlength=3).double() / len(x)


def assert_trained(score_fn, sde, max_error, samples=None, weight_tol=0.04):
    error = score_error(score_fn, sde)
    assert error < max_error < 0.05 * BASELINE, error
    if samples is None:
        with torch.no_grad():
            samples = sd.sample_ode(score_fn, sde, (4000, 2), steps=40, solver="dpmpp_2m",
                                    generator=torch.Generator().manual_seed(7)).x
    assert (mode_weights(samples) - GM.weights).abs().max() < weight_tol, mode_weights(samples)


VP = sd.VPSDE()


def by_sigma(net):
    """score_sde's ``scale_by_sigma``: a score network ``net(x, t) / sigma(t)``, well scaled at every ``t``."""
    return lambda x, t: net(x, t) / VP.marginal(t)[1][:, None]


# name: (loss, parameterization, model from net); measured score errors 0.0024, 0.0026, 0.0018 and
# largest mode-weight errors 0.019, 0.024, 0.020
DSM_CASES = {
    "eps_simple": (dict(parameterization="eps", weighting="simple"), "eps", lambda net: net),
    "score_sigma2": (dict(parameterization="score", weighting="sigma2"), "score", by_sigma),
    "v_likelihood_importance": (dict(parameterization="v", weighting="likelihood", importance_sampling=True), "v",
                                lambda net: net),
}


@pytest.mark.parametrize("case", list(DSM_CASES))
def test_denoising_score_matching_learns_the_score(case):
    options, prediction, wrap = DSM_CASES[case]
    net = train(lambda net, x0, g: sd.dsm_loss(wrap(net), VP, x0, t_min=1e-3, generator=g, **options), TimeMLP())
    assert_trained(sd.as_score_fn(wrap(net), VP, prediction), VP, max_error=0.004)


def test_sliced_score_matching_learns_the_score():
    """SSM-VR on noisy data at random t, weighted by sigma^2: noisier gradients, so more steps (measured error 0.0039)."""

    def loss(net, x0, g):
        t = 0.01 + 0.99 * torch.rand(x0.shape[0], generator=g)
        sigma = VP.marginal(t)[1][:, None]
        xt = VP.perturb(x0, t, torch.randn(x0.shape, generator=g))
        return sigma[:, 0] ** 2 * sd.ssm_loss(lambda x: -net(x, t) / sigma, xt, variance_reduction=True, generator=g)

    net = train(loss, TimeMLP(), steps=2500)
    assert_trained(sd.as_score_fn(net, VP, "eps"), VP, max_error=0.008)


def test_improved_ddpm_hybrid_loss_with_importance_sampling_and_learned_variance():
    """L_hybrid on 200 cosine timesteps with the loss-history sampler; DDPM sampling with the learned variance."""
    N = 200
    sde = sd.VPSDE.from_betas(sd.CosineSchedule().discrete_betas(N))
    sampler = sd.LossHistorySampler(N)

    class Discrete(TimeMLP):
        def forward(self, x, n):
            return super().forward(x, (n.to(x.dtype) + 1.0) / N)

    def loss(net, x0, g):
        n, weights = sampler.sample(x0.shape[0], generator=g)
        out = sd.hybrid_loss(net, sde, x0, timesteps=n, low=-3.0, high=3.0, generator=g)
        sampler.update(n, out.loss)
        return out.loss * weights.to(out.loss.dtype)

    net = train(loss, Discrete(2, 4))
    assert sampler.warmed_up
    model = sd.LearnedVariance(net, sde)
    with torch.no_grad():
        samples = sd.sample_ddpm(model, sde, (4000, 2), generator=torch.Generator().manual_seed(3)).x
        frac = model.interpolation(torch.zeros(N, 2), torch.arange(1, N + 1, dtype=torch.float32) / N)
    # Measured error 0.0024; the variance output stays inside [beta~, beta] (frac 0.5-0.9).
    assert_trained(model, sde, max_error=0.006, samples=samples)
    assert bool(((frac > -0.1) & (frac < 1.1)).all())


@pytest.mark.parametrize("objective", ["distillation", "training"])
def test_consistency_models_sample_the_mixture_in_one_or_two_steps(objective):
    """CD from the exact score (Heun teacher) and CT without a teacher, N = 18, EMA 0.99.

    Measured: CD, one step: mode weights (0.199, 0.317, 0.484), stds (1.09, 1.14) against (1.08, 1.13);
    CT, two steps (80, 0.8): (0.188, 0.315, 0.498), stds (0.93, 0.98): CT is less dispersed.
    """
    import copy

    from sdediff.consistency import (ConsistencyFunction, consistency_distillation_loss, consistency_training_loss,
                                     ema_update, sample_consistency)

    edm = sd.EDMSDE()
    f = ConsistencyFunction(TimeMLP(2, log_time=True, sigma_data=0.5))
    f_ema = copy.deepcopy(f)

    def loss(net, x0, g):
        if objective == "distillation":
            out = consistency_distillation_loss(net, f_ema, GM.score_fn(edm), x0, N=18, solver="heun", generator=g)
        else:
            out = consistency_training_loss(net, f_ema, x0, N=18, generator=g)
        ema_update(f_ema, net, 0.99)  # after the loss: the target is the EMA of the previous steps
        return out

    train(loss, f, steps=2000, lr=2e-3)
    times = (80.0,) if objective == "distillation" else (80.0, 0.8)
    with torch.no_grad():
        samples = sample_consistency(f_ema.eval(), (4000, 2), times=times, generator=torch.Generator().manual_seed(1)).x
    assert (mode_weights(samples) - GM.weights).abs().max() < 0.04, mode_weights(samples)
    std_ratio = samples.double().std(0) / GM.covariance().diagonal().sqrt()
    assert ((std_ratio - 1).abs() < (0.05 if objective == "distillation" else 0.15)).all(), std_ratio


def test_progressive_distillation_halves_the_steps():
    """One round of progressive distillation from the exact score: a v-predicting student in 4 DDIM steps follows the
    teacher's 8 DDIM steps from the same noise.

    Measured: pathwise RMS distance to the teacher's 8-step samples 0.044 (student, 4 steps) against 0.43 (teacher,
    4 steps); mode weights equal the teacher's to 0.003. An eps-predicting student fails (0.87): at t = 1 its x0 is
    eps divided by alpha = 0.0066, as Salimans & Ho note.
    """
    N = 4
    student = train(lambda net, x0, g: sd.progressive_distillation_loss(net, GM.score_fn(VP), VP, x0, N=N,
                                                                        prediction="v", generator=g), TimeMLP())

    def ddim(score_fn, steps):
        x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            return sd.integrate(sd.ReverseProcess(VP, score_fn, 0.0).ode_term(), x, torch.linspace(1.0, 0.0, steps + 1),
                                solver="ddim").x

    student_4 = ddim(sd.as_score_fn(student, VP, "v"), N)
    teacher_8, teacher_4 = ddim(GM.score_fn(VP), 2 * N), ddim(GM.score_fn(VP), N)
    distance = (student_4 - teacher_8).pow(2).sum(1).mean().sqrt().item()
    baseline = (teacher_4 - teacher_8).pow(2).sum(1).mean().sqrt().item()
    assert distance < 0.1 < 0.4 < baseline
    assert (mode_weights(student_4) - mode_weights(teacher_8)).abs().max() < 0.02


def test_classifier_free_training_with_condition_dropout():
    """A label-conditional network trained with drop_condition (p = 0.2) is both models that CFG combines.

    Labels: components 0 and 1 are class 0, component 2 is class 1; the null label is 2. Measured mode
    weights: null (0.19, 0.32, 0.49) against (0.2, 0.3, 0.5); class 0 (0.40, 0.60, 0.00) against (0.4, 0.6, 0);
    class 1 (0, 0, 1).
    """
    labelled = sd.GaussianMixture(GM.weights, GM.means, GM.stds, labels=[0, 0, 1])
    null = 2

    class Conditional(TimeMLP):
        def __init__(self):
            super().__init__(2)
            self.embed = torch.nn.Embedding(3, 8)
            first = self.body[0]
            self.body[0] = torch.nn.Linear(first.in_features + 8, first.out_features)

        def forward(self, x, t, y):
            t = t.to(x.dtype).reshape(-1, 1)
            features = [x, t, torch.sin(self.k * t), torch.cos(self.k * t), self.embed(y)]
            return self.body(torch.cat(features, 1))

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = Conditional()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=STEPS, pct_start=0.1)
    for _ in range(STEPS):
        x0, components = labelled.sample(BATCH, generator=g, dtype=torch.float32, return_components=True)
        y = sd.drop_condition(labelled.labels[components], null, 0.2, generator=g)
        loss = sd.dsm_loss(lambda x, t: net(x, t, y), VP, x0, parameterization="eps", t_min=1e-3, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    score_fn = sd.as_score_fn(net.eval(), VP, "eps")

    def weights(label, scale=0.0):
        guided = sd.classifier_free_guidance(score_fn, scale=scale, y=torch.tensor([label]), null=null)
        with torch.no_grad():
            x = sd.sample_ode(guided, VP, (3000, 2), steps=40, solver="dpmpp_2m",
                              generator=torch.Generator().manual_seed(5)).x
        return mode_weights(x)

    assert (weights(null) - GM.weights).abs().max() < 0.04
    assert (weights(0) - torch.tensor([0.4, 0.6, 0.0], dtype=torch.float64)).abs().max() < 0.04
    assert weights(1)[2] > 0.99
