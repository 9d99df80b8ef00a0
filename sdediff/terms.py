"""What a solver integrates: a vector field (ODE) or a drift and a diagonal diffusion (SDE).

Kept apart from the solvers (as in diffrax) so that one solver serves any process: the
probability-flow ODE, a reverse-time SDE, or a textbook SDE such as geometric Brownian motion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ODETerm:
    """``dx/dt = vector_field(x, t)``; ``x: (batch, *dims)``, ``t``: 0-d tensor.

    ``process``: the :class:`~sdediff.ReverseProcess` the field comes from, when it does. Solvers
    built on the forward process's Gaussian transitions (DDIM, exponential integrators) need it.
    """

    vector_field: Field
    process: Optional[Any] = None


@dataclass(frozen=True)
class SDETerm:
    """``dx = drift(x, t) dt + diffusion(x, t) dW`` with diagonal noise.

    ``diffusion`` returns a tensor that broadcasts against ``x`` (component ``i`` of the noise
    drives component ``i`` of ``x``). ``additive=True`` declares that it does not depend on
    ``x``. ``diffusion_dx(x, t)`` optionally gives ``d g_i / d x_i`` for Milstein; without it,
    Milstein differentiates ``diffusion`` with autograd. ``process`` as in :class:`ODETerm`.
    """

    drift: Field
    diffusion: Field
    additive: bool = False
    diffusion_dx: Optional[Field] = None
    process: Optional[Any] = None
