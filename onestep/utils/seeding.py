"""Every seed formula of the toolkit, in one place.

All randomness is a pure function of a recipe's ``seed`` and an index (step, epoch, sample, rank),
so a resumed run, a different batch size or a different number of ranks reproduces the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MIX = 1_000_003


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The global RNG seed of training step ``step`` on ``rank`` (times, noise, dropout)."""
    return (seed * _MIX + step) * 65_537 + rank + 17


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the data permutation of ``epoch`` (finite datasets)."""
    return seed * _MIX + epoch


def batch_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of step ``step``'s fresh batch on ``rank`` (data generated on the fly)."""
    return (seed * _MIX + step) * 4099 + rank


def sample_seed(seed: int, index: int) -> int:
    """The noise seed of evaluation sample ``index``."""
    return seed * _MIX + index


def renoise_seed(seed: int, step: int) -> int:
    """Seed of the re-noising draw after sampling step ``step`` for a sample seeded ``seed``."""
    return (int(seed) * 1_000_033 + 7_919 * (step + 1)) % (2**63 - 1)


def seeded_noise(seeds, shape: tuple[int, ...], device=None, dtype=torch.float32) -> Tensor:
    """Standard normal noise (len(seeds), *shape) with one generator per sample, so sample i is the
    same at any batch size."""
    out = torch.empty((len(seeds), *shape), dtype=dtype)
    g = torch.Generator()
    for i, s in enumerate(seeds):
        g.manual_seed(int(s))
        out[i] = torch.randn(shape, generator=g, dtype=dtype)
    return out.to(device)
