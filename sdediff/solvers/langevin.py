"""Langevin correctors: MCMC steps at a fixed time ``t`` that leave ``p_t`` invariant (as the step shrinks).

One step is ``x <- x + eps score(x, t) + sqrt(2 eps) z``, ``z ~ N(0, I)``; the correctors differ
only in the step size ``eps``. The step is pure (it takes ``z``); the loop in
:func:`sdediff.integrate` draws the noise and runs ``n_steps`` of them at each time.
"""

from __future__ import annotations

import torch

from .. import _checks
from ..sdes import bcast


class Corrector:
    """Base class: ``step_size`` per sample, ``(batch,)``, from the state, the score and the noise."""

    name = ""

    def __init__(self, n_steps: int = 1):
        self.n_steps = _checks.positive_int("n_steps", n_steps)

    def step_size(self, process, x, t, score, z) -> torch.Tensor:
        raise NotImplementedError

    def step(self, process, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One Langevin step at time ``t`` with the standard normal draw ``z`` (shape of ``x``)."""
        score = process.score(x, t)
        # in the state's dtype: a half-precision state's float32 time must not promote it
        eps = bcast(self.step_size(process, x, t, score, z), x).to(x.dtype)
        return x + eps * score + torch.sqrt(2.0 * eps) * z

    def __repr__(self):
        return f"{type(self).__name__}(n_steps={self.n_steps})"


def _norms(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1)


class LangevinCorrector(Corrector):
    """The corrector of Song et al. (2021): ``eps = 2 (snr ||z|| / ||score||)^2``.

    The step is set so that the noise is ``snr`` times the size of the score step. As in
    score_sde, the norms are averaged over the batch, so one step size serves the whole batch:
    per-sample norms would give huge steps to samples that sit where the score nearly vanishes,
    which in low dimensions is common. (score_sde's VP factor ``1 - beta_i`` tends to 1 in
    continuous time and is left out.)
    """

    name = "langevin"

    def __init__(self, snr: float = 0.16, n_steps: int = 1):
        super().__init__(n_steps)
        self.snr = _checks.real("snr", snr, low=0.0, low_open=True)

    def step_size(self, process, x, t, score, z):
        eps = 2.0 * (self.snr * _norms(z).mean() / _norms(score).mean()) ** 2
        return eps.expand(x.shape[0])

    def __repr__(self):
        return f"LangevinCorrector(snr={self.snr}, n_steps={self.n_steps})"


class AnnealedLangevin(Corrector):
    """NCSN's annealed Langevin dynamics (Song & Ermon 2019): step ``a = r sigma(t)^2 / sigma_last^2``.

    The paper's update is ``x + (a/2) score + sqrt(a) z``, i.e. ``eps = a / 2`` here. (The lecture
    notes in ``../shared/seeds``, Algorithm 3, drop the 1/2: ``x + a score + sqrt(a) z``. Taken
    literally that doubles the drift against the noise and samples ``p^2``, not ``p``.)
    """

    name = "annealed_langevin"

    def __init__(self, step_ratio: float, sigma_last: float, n_steps: int = 100):
        super().__init__(n_steps)
        self.step_ratio = _checks.real("step_ratio", step_ratio, low=0.0, low_open=True)
        self.sigma_last = _checks.real("sigma_last", sigma_last, low=0.0, low_open=True)

    def step_size(self, process, x, t, score, z):
        sigma = process.sde._alpha_sigma(t)[1]
        a = self.step_ratio * (sigma / self.sigma_last) ** 2
        return 0.5 * a.expand(x.shape[0])

    def __repr__(self):
        return f"AnnealedLangevin(step_ratio={self.step_ratio}, sigma_last={self.sigma_last}, n_steps={self.n_steps})"
