"""The Fréchet distance between two Gaussians, in one place (digits FD; torch-fidelity computes FID
itself):

    FD = |μ1 − μ2|² + tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½)

in float64; the matrix square roots are symmetric eigen-decompositions (eigenvalues clipped at 0),
which equals tr((Σ1 Σ2)^½) without complex arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sqrtm_psd(a: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """(mu (D,), sigma (D, D)) in float64, sigma with 1/(N-1)."""
    f = features.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), float64, via eigh."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    s1 = _sqrtm_psd(sigma1)
    middle = s1 @ sigma2 @ s1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return max(float(value), 0.0)
