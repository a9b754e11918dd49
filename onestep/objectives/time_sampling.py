"""Time samplers for flow-matching style objectives (pure functions).

Notation: t in [0, 1] is the current time (noise at t = 1), r <= t the earlier time of a MeanFlow
interval, h = t - r. A logit-normal time is t = sigmoid(mean + std * n), n ~ N(0, 1).

``sample_t_r`` draws (t, r) pairs the way MeanFlow does:

- ``pairing="sort"`` (ImageNet): draw a ~ D(mean_t, std_t) and b ~ D(mean_r, std_r) independently,
  then t = max(a, b), r = min(a, b).
- ``pairing="clip"`` (CIFAR-10, official PyTorch "v1"): draw t ~ D(mean_t, std_t) and
  r ~ D(mean_r, std_r), then r = min(r, t).

Afterwards exactly ``round(ratio_r_neq_t * n)`` samples (rounded half up; a fixed count, not a
coin flip per sample), chosen at random, keep their drawn r and the rest get r = t. With "sort"
the kept samples have r < t almost surely; with "clip" a kept sample whose r draw exceeded t is
clipped to r = t, as in the reference code.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

TimeDist = Literal["logit_normal", "uniform"]
Pairing = Literal["sort", "clip"]


def logit_normal(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n,) float32 samples of sigmoid(mean + std * N(0, 1))."""
    if std <= 0:
        raise ValueError(f"logit-normal std must be > 0, got {std}")
    normal = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(mean + std * normal)


def uniform(n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """(n,) float32 samples of U[0, 1)."""
    return torch.rand(n, generator=generator, device=device, dtype=torch.float32)


def sample_time(
    n: int,
    *,
    dist: TimeDist = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n,) times from ``dist``: logit-normal(mean, std) or uniform (mean/std ignored)."""
    if dist == "logit_normal":
        return logit_normal(n, mean, std, generator=generator, device=device)
    if dist == "uniform":
        return uniform(n, generator=generator, device=device)
    raise ValueError(f"time distribution must be one of 'logit_normal', 'uniform'; got {dist!r}")


def num_r_neq_t(n: int, ratio_r_neq_t: float) -> int:
    """The fixed number of samples of a batch of n that keep r != t: round half up of ratio * n."""
    check_ratio(ratio_r_neq_t)
    return min(n, int(math.floor(ratio_r_neq_t * n + 0.5)))


def check_ratio(ratio_r_neq_t: float) -> None:
    if not 0.0 <= ratio_r_neq_t <= 1.0:
        raise ValueError(f"ratio_r_neq_t (the share of samples with r != t) must be in [0, 1], got {ratio_r_neq_t}")


def sample_t_r(
    n: int,
    *,
    mean_t: float = -0.4,
    std_t: float = 1.0,
    mean_r: float = -0.4,
    std_r: float = 1.0,
    ratio_r_neq_t: float = 0.25,
    pairing: Pairing = "sort",
    dist: TimeDist = "logit_normal",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw (t, r), each (n,) float32 with 0 <= r <= t <= 1 (module docstring for the recipe).

    Defaults are MeanFlow's ImageNet setting: logit-normal(-0.4, 1.0) for both, sorted, 25 % of the
    samples with r != t.
    """
    check_ratio(ratio_r_neq_t)
    if pairing not in ("sort", "clip"):
        raise ValueError(f"pairing must be one of 'sort', 'clip'; got {pairing!r}")
    # Draw the two times independently.
    a = sample_time(n, dist=dist, mean=mean_t, std=std_t, generator=generator, device=device)
    b = sample_time(n, dist=dist, mean=mean_r, std=std_r, generator=generator, device=device)
    # Order them: t >= r.
    if pairing == "sort":
        t, r = torch.maximum(a, b), torch.minimum(a, b)
    else:
        t, r = a, torch.minimum(a, b)
    # Keep r != t on a fixed, randomly placed count of samples; r = t elsewhere.
    keep = torch.zeros(n, dtype=torch.bool, device=t.device)
    chosen = torch.randperm(n, generator=generator, device=device)[: num_r_neq_t(n, ratio_r_neq_t)]
    keep[chosen.to(t.device)] = True
    r = torch.where(keep, r, t)
    return t, r
