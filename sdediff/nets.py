"""A small time-conditioned network for toy problems: the examples', the docs' and the tests' model."""

from __future__ import annotations

import math

import torch


class TimeMLP(torch.nn.Module):
    """``net(x, t) -> (batch, out)`` for flat ``x: (batch, dim)`` and ``t: (batch,)``: an MLP on ``x`` and time features.

    The time enters as ``[tau, sin(k tau), cos(k tau)]``, ``k = 1 .. freqs``, with ``tau = t`` and
    frequencies ``k pi`` (times in ``[0, 1]``), or with ``log_time`` ``tau = log(t) / 4`` and
    frequencies ``k`` (EDM's times in ``[0.002, 80]``). With ``sigma_data`` the input is scaled
    by EDM's ``c_in = 1 / sqrt(sigma_data^2 + t^2)``, so it has about unit variance at every ``t``.
    ``depth`` hidden layers of ``width`` units with SiLU; ``out`` defaults to ``dim``.
    """

    def __init__(self, dim: int = 2, out: int | None = None, *, width: int = 128, depth: int = 3, freqs: int = 4,
                 log_time: bool = False, sigma_data: float | None = None):
        super().__init__()
        self.register_buffer("k", torch.arange(1, freqs + 1) * (1.0 if log_time else math.pi))
        self.log_time, self.sigma_data = log_time, sigma_data
        layers, size = [], dim + 1 + 2 * freqs
        for _ in range(depth):
            layers += [torch.nn.Linear(size, width), torch.nn.SiLU()]
            size = width
        self.body = torch.nn.Sequential(*layers, torch.nn.Linear(size, dim if out is None else out))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype).reshape(-1, 1)
        tau = torch.log(t) / 4 if self.log_time else t
        if self.sigma_data is not None:
            x = x / torch.sqrt(self.sigma_data**2 + t**2)
        return self.body(torch.cat([x, tau, torch.sin(self.k * tau), torch.cos(self.k * tau)], 1))
