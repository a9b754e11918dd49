"""Easy consistency tuning (ECT, Geng et al. 2024), tuned from a flow-matching run.

σ_t ~ lognormal(P_mean, P_std), σ_r = σ_t·(1 − q^{−(stage+1)}·n(σ_t)), n(σ) = 1 + k·sigmoid(−b·σ)
(k = 8, b = 1), stage = ⌊step / stage_steps⌋ — all in ECT's EDM σ convention (their "t" is σ),
then mapped to onestep's t = σ / (1 + σ); σ_r ≤ 0 means the target is the data x. Loss per sample
(√(‖Δ‖² + c²) − c) / (σ_t − σ_r) with Δ = f_θ(z_t) − sg f_θ(z_r) sharing the noise, c = 0 by default
(the un-squared ℓ2 norm). The consistency function, sampler and time grid are the consistency
family's (``onestep.objectives.consistency``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from onestep.objectives.base import LossOutput, register_objective
from onestep.objectives.common import check_choice, check_range, drop_labels, interpolate, num_classes_of
from onestep.objectives.consistency import Consistency, pair_weights
from onestep.objectives.consistency_math import SIGMA_MID, ect_r, sigma_to_t

__all__ = ["EasyConsistencyTuning"]


@register_objective("ect")
class EasyConsistencyTuning(Consistency):
    """Easy consistency tuning (ECT, Geng et al. 2024), tuned from a flow-matching run.

    Start it from a flow-matching checkpoint with ``train.init_from``.

    Args:
        stage_steps: steps per stage of the r(t) mapping, stage = ⌊step / stage_steps⌋ (ECT CIFAR-10:
            250 ticks × 12.8 kimg at batch 128 = 25 000 steps).
        q: the per-stage shrink factor of σ_t − σ_r (CIFAR-10: 2).
        mapping_k, mapping_b: n(σ) = 1 + k·sigmoid(−b·σ) (8, 1).
        P_mean, P_std: σ_t ~ lognormal(P_mean, P_std) (−1.1, 2.0).
        huber_c: c of d = √(‖Δ‖² + c²) − c (0: the un-squared ℓ2 norm of the paper).
        weighting: "inverse_delta" 1/(σ_t − σ_r) (the paper) or "uniform".
        interval: "zero" (default: a flow-matching checkpoint starts as the denoiser) or "t".
        sigma_min, sigma_max, rho: only the sampler's start σ_max and σ_mid matter here.
        class_dropout: probability of the null label (conditional nets only).
    """

    def __init__(
        self,
        stage_steps: int = 25_000,
        q: float = 2.0,
        mapping_k: float = 8.0,
        mapping_b: float = 1.0,
        P_mean: float = -1.1,
        P_std: float = 2.0,
        huber_c: float = 0.0,
        weighting: Literal["inverse_delta", "uniform"] = "inverse_delta",
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_mid: float = SIGMA_MID,
        class_dropout: float = 0.1,
        interval: Literal["t", "zero"] = "zero",
    ):
        super().__init__(
            metric="pseudo_huber",
            huber_c=huber_c,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            rho=rho,
            sigma_mid=sigma_mid,
            class_dropout=class_dropout,
            interval=interval,
        )
        if not isinstance(stage_steps, int) or stage_steps < 1:
            raise ValueError(f"stage_steps must be an int >= 1, got {stage_steps!r}")
        check_range("q", q, 1.0, low_open=True)
        check_range("P_std", P_std, 0.0, low_open=True)
        check_choice("weighting", weighting, ("inverse_delta", "uniform"))
        self.stage_steps, self.q = stage_steps, float(q)
        self.mapping_k, self.mapping_b = float(mapping_k), float(mapping_b)
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.weighting = weighting

    def stage(self, step: int) -> int:
        return step // self.stage_steps

    def loss(
        self,
        net: nn.Module,
        x: Tensor,
        y: Tensor | None,
        *,
        step: int,
        feature_blocks: tuple[int, ...] = (),
        target_net: nn.Module | None = None,
    ) -> LossOutput:
        """Per-sample ECT loss (B,)."""
        # σ_t ~ lognormal, σ_r from the stage's mapping (float64), then to t.
        stage = self.stage(step)
        sigma_t = torch.exp(self.P_mean + self.P_std * torch.randn(x.shape[0], device=x.device, dtype=torch.float64))
        sigma_r = ect_r(sigma_t, stage, self.q, self.mapping_k, self.mapping_b)
        t, r = sigma_to_t(sigma_t).to(x.dtype), sigma_to_t(sigma_r).to(x.dtype)
        # Shared noise for both points.
        e = torch.randn_like(x)
        z_t, z_r = interpolate(x, e, t), interpolate(x, e, r)
        y = drop_labels(y, num_classes_of(net), self.class_dropout)
        # r <= 0: the target is the data (pair_loss handles it).
        return self.pair_loss(
            net,
            net,
            x,
            y,
            z_hi=z_t,
            t_hi=t,
            z_lo=z_r,
            t_lo=r,
            weight=pair_weights(self.weighting, sigma_r, sigma_t),
            feature_blocks=feature_blocks,
            logs={"stage": float(stage), "data_target_fraction": float((sigma_r <= 0).float().mean())},
        )
