"""Samplers of a flow map u_θ(z, t, h) (MeanFlow, α-Flow, Decoupled MeanFlow): Euler flow-map steps
and the restart (consistency) sampler, on a uniform or shifted time grid.

- ``euler``: z_r = z_t − (t − r)·u_θ(z_t, t, h = t − r). 1 NFE: x = e − u_θ(e, 1, 1); 2 NFE on the
  uniform grid 1 → 0.5 → 0.
- ``restart``: every step jumps to the data, x̂ = z_t − t·u_θ(z_t, t, h = t), then re-noises to the
  next time with fresh noise e′: z_r = (1 − r)·x̂ + r·e′ (the last step returns x̂). Both α-Flow and
  DMF use it for 2 NFE (α-Flow's "consistency sampling", DMF's ``restart_sampler``).
- ``time_shift`` s: the grid t_k = k/N mapped to s·t / (1 + (s − 1)·t) (s = 1: uniform; DMF uses
  s = 1.5 at 512 px).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from onestep.objectives.common import batch_time, check_choice, check_range, expand_time, num_classes_of

SAMPLERS = ("euler", "restart")
Sampler = Literal["euler", "restart"]


def shifted_grid(nfe: int, shift: float = 1.0) -> Tensor:
    """Descending times 1 → 0 (length nfe + 1), each t mapped to s·t / (1 + (s − 1)·t)."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if shift == 1.0:
        return torch.linspace(1.0, 0.0, nfe + 1)  # the uniform grid of every other objective, bit for bit
    t = torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)
    return (shift * t / (1.0 + (shift - 1.0) * t)).float()


class FlowMapSampling:
    """Mixin: ``sample_step`` / ``time_grid`` for objectives whose net is a flow map u_θ(z, t, h)."""

    sampler: str = "euler"
    time_shift: float = 1.0

    def set_sampler(self, sampler: str, time_shift: float) -> None:
        check_choice("sampler", sampler, SAMPLERS)
        check_range("time_shift", time_shift, 0.0, low_open=True)
        self.sampler, self.time_shift = sampler, float(time_shift)

    @property
    def stochastic_sampling(self) -> bool:
        """The restart sampler draws fresh noise between steps (``sampling.sample`` seeds it)."""
        return self.sampler == "restart"

    def time_grid(self, nfe: int) -> Tensor:
        return shifted_grid(nfe, self.time_shift)

    @torch.no_grad()
    def sample_step(
        self, net: nn.Module, x: Tensor, t: Tensor | float, r: Tensor | float, y: Tensor | None, noise=None
    ) -> Tensor:
        """Euler: z_r = z_t − (t − r)·u_θ(z_t, t, t − r); restart: x̂ = z_t − t·u_θ(z_t, t, t), then
        (1 − r)·x̂ + r·noise (x̂ itself at r = 0)."""
        t, r = batch_time(t, x), batch_time(r, x)
        if num_classes_of(net) == 0:
            y = None
        if self.sampler == "euler":
            return x - expand_time(t - r, x) * net(x, t, t - r, y)
        x_hat = x - expand_time(t, x) * net(x, t, t, y)
        if bool((r <= 0).all()):
            return x_hat
        noise = torch.randn_like(x) if noise is None else noise.to(x)
        return (1 - expand_time(r, x)) * x_hat + expand_time(r, x) * noise
