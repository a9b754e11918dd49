"""The only sampling loop: previews, ``onestep sample`` and ``onestep eval`` all call ``sample``."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from onestep.utils.seeding import renoise_seed, seeded_noise


@torch.no_grad()
def sample(objective, net: nn.Module, noise: Tensor, y: Tensor | None = None, nfe: int = 1,
           grid: Tensor | None = None, seeds=None) -> Tensor:
    """Integrate from noise (t = 1) to data (t = 0) in ``nfe`` network calls.

    noise: (B, ...) standard normal; y: (B,) class ids or None; grid: descending times of length
    nfe + 1 (default ``objective.time_grid(nfe)``). Returns (B, ...) samples in data coordinates.
    Objectives with ``stochastic_sampling`` (multi-step consistency sampling re-noises between
    steps) get fresh noise per step: with ``seeds`` (one per sample) it is drawn per sample from
    (seed, step), so a sample does not depend on its batch or rank; without, from the global RNG.
    """
    grid = objective.time_grid(nfe) if grid is None else torch.as_tensor(grid, dtype=torch.float32)
    if grid.ndim != 1 or len(grid) < 2:
        raise ValueError(f"grid must be 1-D with at least 2 times, got shape {tuple(grid.shape)}")
    if seeds is not None and len(seeds) != noise.shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {noise.shape[0]}")
    stochastic = bool(getattr(objective, "stochastic_sampling", False))
    x = objective.prior(noise)
    for k, (t, r) in enumerate(zip(grid[:-1].tolist(), grid[1:].tolist())):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        rr = torch.full((x.shape[0],), r, device=x.device, dtype=x.dtype)
        extra = {}
        if stochastic and seeds is not None and r > 0:
            extra["noise"] = seeded_noise([renoise_seed(s, k) for s in seeds], tuple(x.shape[1:]), x.device, x.dtype)
        x = objective.sample_step(net, x, tt, rr, y, **extra)
    return x


def balanced_labels(indices, num_classes: int) -> Tensor | None:
    """Class i % num_classes for sample index i (None when unconditional)."""
    if num_classes <= 0:
        return None
    return torch.as_tensor(list(indices), dtype=torch.long) % num_classes
