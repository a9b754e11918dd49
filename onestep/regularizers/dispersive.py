"""Dispersive loss (Wang & He 2025, arXiv 2506.09027): spread intermediate representations apart.

Notation: z_i, i = 1..B, the block output of sample i of the *same noised batch* the main loss uses,
flattened to a vector of D' elements (Z is (B, D')). No projection head, no extra data, no extra
parameters; the training loss is L = mean_i L_main(x_i) + λ·L_disp(Z), averaged over the listed
blocks. "Negatives" are the other samples of the (per-device, or gathered) batch.

Variants (pure functions of a (B, ...) feature tensor, all computed in float32 or wider):

    infonce_l2      log( (1/B²) Σ_i Σ_j exp(−‖z_i − z_j‖² / (τ·D')) )           (the default)
    infonce_cosine  log( (1/B²) Σ_i Σ_j exp( cos(z_i, z_j) / τ ) )
    hinge           (1/B²) Σ_i Σ_j max(0, ε − ‖z_i − z_j‖² / D')²
    covariance      (1/(D'(D'−1))) Σ_{m≠n} C_mn²,   C = ẑᵀẑ / (B − 1),  ẑ = batch-standardized z

All double sums run over every ordered pair, diagonal (i = j) included.

- Per-element distance: the squared distance is divided by D' (the flattened size), as the official
  PyTorch code does (``pdist(z)² / z.shape[1]``), so τ and ε do not depend on the block's size.
- Paper defaults: JAX (the paper's numbers) λ = 0.5, τ = 0.5, block index num_layers // 4 (block 3
  of 12 for B/2, 7 of 28 for XL/2 — the backbones' ``encoder_blocks``); the PyTorch release uses
  λ = 0.25, τ = 1 and the last block.
- Properties of infonce_l2: L = 0 when all z_i are identical; L ≥ −log B always (the B diagonal
  terms contribute exp(0) = 1 each), reached when all pairs are far apart. It gets near its floor
  in a few steps — expected.
- B = 1 (after gathering) has no negatives: every variant returns a constant 0 and warns once per
  process.
- ``gather=True`` with an initialized torch.distributed group of world size W > 1 all-gathers the
  features with gradients (``torch.distributed.nn.functional.all_gather``; equal local batch sizes
  required) and evaluates the loss on the concatenated batch [rank 0, rank 1, ...]. Every rank
  computes the same global L, and all_gather's backward sums the W ranks' gradients, so the gradient
  reaching rank k's local features is W·∂L/∂z_(k): W times the matching slice of the single-process
  gradient. After the usual mean of parameter gradients over ranks (DDP), the parameter gradient is
  exactly that of λ·L on the global batch, matching the main loss' global mean.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from onestep.registry import REGULARIZERS, ConfigError

__all__ = [
    "infonce_l2",
    "infonce_cosine",
    "hinge",
    "covariance",
    "pairwise_sq_distances",
    "gather_features",
    "DispersiveLoss",
    "dispersive",
    "VARIANTS",
]

Variant = Literal["infonce_l2", "infonce_cosine", "hinge", "covariance"]

_warned_single_sample = False


def _flatten(z: Tensor) -> Tensor:
    """(B, ...) -> (B, D') in float32 or wider."""
    z = z.flatten(1) if z.dim() != 2 else z
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _warn_single_sample() -> None:
    global _warned_single_sample
    if not _warned_single_sample:
        _warned_single_sample = True
        warnings.warn(
            "dispersive loss: batch of 1 sample has no negatives; the regularizer is a constant 0 "
            "(use a larger per-device batch or gather: true)",
            RuntimeWarning,
            stacklevel=3,
        )


def _single(z: Tensor) -> Tensor | None:
    """A constant 0 (with a one-time warning) when z has fewer than 2 samples, else None."""
    if z.shape[0] >= 2:
        return None
    _warn_single_sample()
    return torch.zeros((), dtype=z.dtype, device=z.device)


def pairwise_sq_distances(z: Tensor) -> Tensor:
    """(B, D) -> (B, B) squared Euclidean distances ‖z_i − z_j‖², exact zeros on the diagonal.

    Gram form ‖z_i‖² + ‖z_j‖² − 2 z_i·z_j on batch-centered z (distances are translation invariant;
    centering keeps the cancellation relative to the spread, not the offset), clamped at 0.
    """
    z = z - z.mean(0, keepdim=True)
    sq = z.square().sum(1)
    d = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0)
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return d.masked_fill(eye, 0.0)


def _log_mean_exp(logits: Tensor) -> Tensor:
    """log((1/n) Σ exp(logits)) over all n entries, stably."""
    return torch.logsumexp(logits.flatten(), 0) - math.log(logits.numel())


def infonce_l2(z: Tensor, tau: float = 0.5) -> Tensor:
    """InfoNCE-ℓ2 dispersive loss of features z (B, ...) -> scalar.

        L = log( (1/B²) Σ_i Σ_j exp(−‖z_i − z_j‖² / (τ·D')) ),  D' = z[0].numel(), diagonal included.

    L = 0 for identical z_i, −log B ≤ L ≤ 0, → −log B when all pairs are far apart.
    """
    z = _flatten(z)
    if (zero := _single(z)) is not None:
        return zero
    return _log_mean_exp(-pairwise_sq_distances(z) / (tau * z.shape[1]))


def infonce_cosine(z: Tensor, tau: float = 0.5) -> Tensor:
    """InfoNCE-cosine dispersive loss of features z (B, ...) -> scalar.

        L = log( (1/B²) Σ_i Σ_j exp(−D(z_i, z_j) / τ) ),  D(z_i, z_j) = −cos(z_i, z_j),

    i.e. the cosine similarity divided by τ inside the exponent; no division by D' (the cosine is
    already size-free); diagonal included (cos(z_i, z_i) = 1). Range 0 ≤ L ≤ 1/τ: L = 1/τ for
    identical (or parallel) z_i; L ≥ (1/(B²τ))·‖Σ_i z_i/‖z_i‖‖² ≥ 0 by Jensen. (Using the cosine
    distance 1 − cos instead would shift L by −1/τ and leave the gradient unchanged.)
    """
    z = _flatten(z)
    if (zero := _single(z)) is not None:
        return zero
    u = F.normalize(z, dim=1, eps=1e-12)
    cos = (u @ u.T).clamp(-1.0, 1.0)
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    cos = cos.masked_fill(eye, 1.0)
    return _log_mean_exp(cos / tau)


def hinge(z: Tensor, margin: float = 1.0) -> Tensor:
    """Hinge dispersive loss of features z (B, ...) -> scalar.

        L = (1/B²) Σ_i Σ_j max(0, ε − D(z_i, z_j))²,   D(z_i, z_j) = ‖z_i − z_j‖² / D',   ε = ``margin``

    D is the per-element squared distance (the same scaling as infonce_l2), default ε = 1 (the paper
    gives no value; for unit-variance independent features E[D] = 2, so ε = 1 only pushes pairs that
    are closer than half the typical distance). Diagonal included: it adds the constant ε²/B (no
    gradient). L = ε² for identical z_i; floor ε²/B once every pair is at least ε apart.
    """
    z = _flatten(z)
    if (zero := _single(z)) is not None:
        return zero
    d = pairwise_sq_distances(z) / z.shape[1]
    return (margin - d).clamp_min(0.0).square().mean()


def covariance(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Covariance (decorrelation) dispersive loss of features z (B, ...) -> scalar.

        ẑ_im = (z_im − μ_m) / sqrt(σ_m² + eps)   (batch mean, unbiased batch variance per element m)
        C    = ẑᵀ ẑ / (B − 1)                     (D' × D' correlation matrix; C_mm = σ²/(σ² + eps) ≈ 1)
        L    = (1 / (D'(D' − 1))) Σ_{m≠n} C_mn²  (off-diagonal only: the diagonal is ≈ 1, a constant)

    the mean squared off-diagonal correlation, in [0, 1]; 0 for D' = 1. Computed without the D'×D'
    matrix when D' > B, using Σ_{m,n} C_mn² = ‖ẑ ẑᵀ‖_F² / (B − 1)². Note: identical z_i standardize
    to 0, so L = 0 there too (this variant decorrelates dimensions; it does not penalize collapse of
    samples by itself).
    """
    z = _flatten(z)
    if (zero := _single(z)) is not None:
        return zero
    b, d = z.shape
    if d < 2:
        return torch.zeros((), dtype=z.dtype, device=z.device)
    mean = z.mean(0, keepdim=True)
    var = z.var(0, unbiased=True, keepdim=True)
    zs = (z - mean) / torch.sqrt(var + eps)
    diag = zs.square().sum(0) / (b - 1)  # C_mm, (D',)
    if d <= b:
        total = ((zs.T @ zs) / (b - 1)).square().sum()
    else:
        total = ((zs @ zs.T) / (b - 1)).square().sum()
    off = (total - diag.square().sum()).clamp_min(0.0)
    return off / (d * (d - 1))


VARIANTS: dict[str, Callable[..., Tensor]] = {
    "infonce_l2": infonce_l2,
    "infonce_cosine": infonce_cosine,
    "hinge": hinge,
    "covariance": covariance,
}


def feature_rms(blocks: list[Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """The scale of what a regularizer sees: the RMS of its blocks' features (the mean square of each
    block, averaged over blocks; no graph), computed in ``dtype``. An InfoNCE-l2 term can be lowered
    by growing the features; this shows whether it is (``stats.jsonl`` ``feature_rms_<name>``,
    ``tools/feature_scale.py``)."""
    return torch.stack([z.detach().to(dtype).square().mean() for z in blocks]).mean().sqrt()


def gather_features(z: Tensor) -> Tensor:
    """Concatenate z (B, ...) over all ranks, rank order, with gradients; z itself when not distributed.

    Needs the same B on every rank. The backward sums the ranks' gradients for each local slice.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    return _GatherRows.apply(z.contiguous())


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward all-reduces the incoming gradient (sum over ranks) and
    returns this rank's rows. (torch.distributed.nn.functional.all_gather, deprecated, aborted gloo
    processes at exit on torch 2.15.)"""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        import torch.distributed as dist

        from onestep.utils.distributed import all_gather_rows

        ctx.rank, ctx.rows = dist.get_rank(), z.shape[0]
        return all_gather_rows(z)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class DispersiveLoss:
    """``reg(features) -> scalar``: one dispersive variant with its settings (module docstring)."""

    def __init__(self, variant: str = "infonce_l2", tau: float = 0.5, margin: float = 1.0, gather: bool = False):
        if variant not in VARIANTS:
            raise ConfigError(f"dispersive: variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
        if not tau > 0:
            raise ConfigError(f"dispersive: tau must be > 0, got {tau}")
        if not margin > 0:
            raise ConfigError(f"dispersive: margin must be > 0, got {margin}")
        self.variant, self.tau, self.margin, self.gather = variant, float(tau), float(margin), bool(gather)

    def __call__(self, features: Tensor) -> Tensor:
        z = _flatten(features)
        if self.gather:
            z = gather_features(z)
        if self.variant in ("infonce_l2", "infonce_cosine"):
            return VARIANTS[self.variant](z, tau=self.tau)
        if self.variant == "hinge":
            return hinge(z, margin=self.margin)
        return covariance(z)

    def __repr__(self) -> str:
        return f"DispersiveLoss(variant={self.variant!r}, tau={self.tau}, margin={self.margin}, gather={self.gather})"


@REGULARIZERS.register("dispersive")
def dispersive(
    variant: Variant = "infonce_l2", tau: float = 0.5, margin: float = 1.0, gather: bool = False
) -> DispersiveLoss:
    """Dispersive loss regularizer (Wang & He 2025) on block features.

    Args:
        variant: "infonce_l2" (default), "infonce_cosine", "hinge" or "covariance".
        tau: temperature τ of the InfoNCE variants (paper JAX 0.5; PyTorch release 1.0).
        margin: hinge margin ε on the per-element squared distance (default 1).
        gather: all-gather features (with gradients) across ranks before the loss.

    The recipe's ``weight`` (λ, paper 0.5) and ``blocks`` ("encoder" = num_layers // 4, or a list)
    belong to the loop, not to this factory.
    """
    return DispersiveLoss(variant, tau, margin, gather)
