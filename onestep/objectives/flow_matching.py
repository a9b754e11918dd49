"""Flow matching (rectified flow) with the linear path; the base that MeanFlow builds on.

Notation: x data, e ~ N(0, I) noise, t in [0, 1] (noise at t = 1), z_t = (1 - t) x + t e,
v = e - x the conditional velocity, u_θ(z, t, h, y) the network output, h = t - r the interval
(h = 0 here, always, so a flow-matching checkpoint is a valid MeanFlow initialization or teacher).

Loss, per sample i (a sum over all non-batch elements, then the adaptive weight):

    l_i   = Σ (u_θ(z_t, t, h=0, y) − v)²
    loss_i = w_i · l_i,   w_i = 1 / sg((l_i + c)^p)        (p = 0: plain L2)

Class dropout: with probability ``class_dropout`` a label becomes the null id ``net.num_classes``
(only for class-conditional nets, ``net.num_classes > 0``).

Sampling (Euler): z_r = z_t − (t − r) · v_θ(z_t, t), optionally with classifier-free guidance
v_θ = v(∅) + w · (v(c) − v(∅)), w = ``guidance_scale`` (1 = no guidance).

Velocity estimate (``velocity_estimate``): "conditional" regresses v = e − x, the paper's target;
"batch_posterior" the batch's estimate of E[v | z_t] (``onestep.objectives.common``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from onestep.objectives.base import LossOutput, Objective, register_objective
from onestep.objectives.common import (
    adaptive_weight,
    batch_time,
    check_adaptive,
    check_range,
    check_velocity_estimate,
    drop_labels,
    expand_time,
    interpolate,
    num_classes_of,
    sum_squares,
    target_velocity,
    velocity,
)
from onestep.objectives.time_sampling import TimeDist, sample_time

# ----------------------------------------------------------------------------------------------
# Objective.


@register_objective("flow_matching")
class FlowMatching(Objective):
    """Flow matching on z_t = (1 − t) x + t e with target v = e − x (multi-step baseline, teacher).

    Args:
        time_dist: "logit_normal" (t = sigmoid(N(mean_t, std_t))) or "uniform".
        mean_t, std_t: logit-normal parameters (SD3/SiT default 0, 1).
        adaptive_p, adaptive_c: adaptive weight 1 / sg((l + c)^p); p = 0 (default) is plain L2.
        class_dropout: probability of the null label during training (conditional nets only).
        guidance_scale: sampling-time CFG scale w (1 = none).
        velocity_estimate: the regression target: "conditional" (v = e − x, default) or
            "batch_posterior" (the batch's estimate of E[v | z_t], module docstring).
    """

    uses_jvp = False

    def __init__(
        self,
        time_dist: Literal["logit_normal", "uniform"] = "logit_normal",
        mean_t: float = 0.0,
        std_t: float = 1.0,
        adaptive_p: float = 0.0,
        adaptive_c: float = 0.01,
        class_dropout: float = 0.1,
        guidance_scale: float = 1.0,
        velocity_estimate: Literal["conditional", "batch_posterior"] = "conditional",
    ):
        if time_dist not in ("logit_normal", "uniform"):
            raise ValueError(f"time_dist must be one of 'logit_normal', 'uniform'; got {time_dist!r}")
        check_range("std_t", std_t, 0.0, low_open=True)
        check_adaptive(adaptive_p, adaptive_c)
        check_range("class_dropout", class_dropout, 0.0, 1.0, high_open=True)
        check_range("guidance_scale", guidance_scale, 0.0)
        check_velocity_estimate(velocity_estimate)
        self.time_dist: TimeDist = time_dist
        self.mean_t, self.std_t = float(mean_t), float(std_t)
        self.adaptive_p, self.adaptive_c = float(adaptive_p), float(adaptive_c)
        self.class_dropout = float(class_dropout)
        self.guidance_scale = float(guidance_scale)
        self.velocity_estimate = velocity_estimate

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
        """Per-sample flow-matching loss (B,), features from the same forward."""
        # Sample t and noise.
        t = sample_time(x.shape[0], dist=self.time_dist, mean=self.mean_t, std=self.std_t, device=x.device)
        e = torch.randn_like(x)
        # Drop labels to the null class.
        y_kept, y = y, drop_labels(y, num_classes_of(net), self.class_dropout)
        v = target_velocity(self.velocity_estimate, x, e, t, y_kept, y, num_classes_of(net))
        return self.loss_given(net, x, y, e=e, t=t, v=v, feature_blocks=feature_blocks)

    def loss_given(
        self,
        net: nn.Module,
        x: Tensor,
        y: Tensor | None,
        *,
        e: Tensor,
        t: Tensor,
        v: Tensor | None = None,
        feature_blocks: tuple[int, ...] = (),
    ) -> LossOutput:
        """The loss for given noise e (like x), times t (B,) and (already dropped) labels y; ``v`` is
        the velocity to regress (default the conditional e − x)."""
        if num_classes_of(net) == 0:
            y = None
        t = t.to(device=x.device, dtype=x.dtype)
        h = torch.zeros_like(t)
        # Noise the data; conditional velocity (or the given estimate).
        z = interpolate(x, e, t)
        v = e - x if v is None else v.to(x.dtype)
        # Predict with h = 0, keeping features from this pass.
        if feature_blocks:
            u, features = net.forward_features(z, t, h, y, blocks=tuple(feature_blocks))
            features = list(features)
        else:
            u, features = net(z, t, h, y), []
        # Per-sample sum of squares, adaptively weighted.
        l = sum_squares(u - v)
        loss = adaptive_weight(l, self.adaptive_p, self.adaptive_c) * l
        logs = {"mse": float(l.detach().mean())}
        return LossOutput(loss=loss, features=features, logs=logs)

    def velocity(self, net: nn.Module, z: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """No-grad v_θ(z, t) with h = 0 and this objective's guidance scale."""
        return velocity(net, z, t, y, self.guidance_scale)

    @torch.no_grad()
    def sample_step(self, net: nn.Module, x: Tensor, t: Tensor | float, r: Tensor | float, y: Tensor | None) -> Tensor:
        """Euler step x_r = x_t − (t − r)·v_θ(x_t, t, h=0, y)."""
        t, r = batch_time(t, x), batch_time(r, x)
        return x - expand_time(t - r, x) * self.velocity(net, x, t, y)
