"""Decoupled MeanFlow (Lee et al. 2025, arXiv 2510.24474): fine-tune a flow model into a flow map.

Notation as in ``meanflow``: x data, e ~ N(0, I), z_t = (1 − t)·x + t·e, v = e − x, times
0 <= r <= t <= 1 (noise at t = 1), h = t − r, the net u_θ(z, t, h, y). The backbone is meant to be a
DiT with decoupled conditioning (``decoupled_depth``: the first blocks see t, the later ones and the
final layer see r), converted from a flow-matching model with no new network parameters; any
backbone in the contract trains.

Every sample of the batch gets two terms, each with its own noise:

- flow matching at τ ~ sigmoid(N(P_mean_fm, P_std_fm)):  e_fm = mean_CHW (u_θ(z_τ, τ, 0, y) − sg ṽ_τ)²
- MeanFlow at t = max(a, b), r = min(a, b), a ~ sigmoid(N(P_mean_t, P_std_t)), b ~ sigmoid(N(P_mean_r,
  P_std_r)): (u, du/dt) from one JVP along (ṽ_t, 1, 1) in (z, t, h), u_tgt = sg(ṽ_t − (t − r)·du/dt),
  e_mf = mean_CHW (u − u_tgt)²

with the learned-variance (Cauchy-type) loss on each, ℓ(e) = log(e·exp(−λ) + c) + λ, λ = λ_φ(t, r) a
zero-initialised linear head on sinusoidal features of t and r (its own parameters, ``trainable``),
c = ``logvar_c`` (0.01): the gradient in θ is ∇e / (e + c·e^λ), MeanFlow's adaptive weight with a
learned, (t, r)-dependent c. Per sample: ½·(ℓ(e_fm) + ℓ(e_mf)).

ṽ, in the targets and as the JVP tangent, is v = e − x except where guided:

- ``guidance: model`` (model guidance, the paper's): ṽ = v + ω·(u_θ(z, τ, 0 | y) − u_θ(z, τ, 0 | ∅)),
  no grad, the online net, for labels kept and g_min <= τ <= g_max. At the fixed point the learned
  velocity is classifier-free guidance with scale 1 / (1 − ω) (2.5 for the paper's ω = 0.6).
- ``guidance: teacher``: ṽ = the frozen ``teacher``'s velocity with classifier-free guidance
  ``teacher_guidance`` on ``teacher_guidance_interval`` (distillation-style; a dropped label gets
  the teacher's unconditional velocity).
- ``guidance: none``: ṽ = v.

Labels are dropped to the null class with probability ``class_dropout`` (both terms share the
drop); dropped samples are not model-guided. Sampling: ``flow_map`` (Euler flow-map steps, or the restart
sampler).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from onestep.backbones.attention import JVP_KERNELS
from onestep.backbones.layers import timestep_features
from onestep.objectives.base import LossOutput, Objective, register_objective
from onestep.objectives.common import (
    check_choice,
    check_guidance_interval,
    check_range,
    drop_labels,
    interpolate,
    num_classes_of,
    velocity,
)
from onestep.objectives.flow_map import FlowMapSampling, Sampler
from onestep.objectives.meanflow import meanflow_jvp, meanflow_target
from onestep.objectives.time_sampling import logit_normal

__all__ = ["DecoupledMeanFlow", "LogVarianceHead", "log_variance_loss", "dmf_times"]

GUIDANCE = ("model", "teacher", "none")


class LogVarianceHead(nn.Module):
    """λ_φ(t, r): sinusoidal features of t and of r (``features`` each), concatenated, then one Linear
    to a scalar, zero-initialised (λ = 0 at the start). (B,), (B,) -> (B,), float32 or wider."""

    def __init__(self, features: int = 128):
        super().__init__()
        if not isinstance(features, int) or features < 2 or features % 2:
            raise ValueError(f"logvar_features must be an even int >= 2, got {features!r}")
        self.features = features
        self.linear = nn.Linear(2 * features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor, r: Tensor) -> Tensor:
        device = t.device
        dtype = torch.promote_types(self.linear.weight.dtype, torch.float32)
        with torch.autocast(device_type=self.linear.weight.device.type, enabled=False):
            t, r = t.to(self.linear.weight.device, dtype), r.to(self.linear.weight.device, dtype)
            feats = torch.cat([timestep_features(t, self.features), timestep_features(r, self.features)], dim=1)
            out = nn.functional.linear(feats.to(dtype), self.linear.weight.to(dtype), self.linear.bias.to(dtype))
        return out.squeeze(1).to(device)


def log_variance_loss(e: Tensor, logvar: Tensor, c: float = 0.01) -> Tensor:
    """ℓ = log(e·exp(−λ) + c) + λ (= log(e + c·e^λ)), (B,), (B,) -> (B,)."""
    return torch.log(e * torch.exp(-logvar) + c) + logvar


def dmf_times(
    n: int,
    *,
    mean_fm: float,
    std_fm: float,
    mean_t: float,
    std_t: float,
    mean_r: float,
    std_r: float,
    device=None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(τ of the flow-matching term, t, r of the MeanFlow term), each (n,): τ ~ sigmoid(N(mean_fm,
    std_fm)); a ~ sigmoid(N(mean_t, std_t)), b ~ sigmoid(N(mean_r, std_r)), t = max, r = min."""
    tau = logit_normal(n, mean_fm, std_fm, generator=generator, device=device)
    a = logit_normal(n, mean_t, std_t, generator=generator, device=device)
    b = logit_normal(n, mean_r, std_r, generator=generator, device=device)
    return tau, torch.maximum(a, b), torch.minimum(a, b)


def mean_squares(diff: Tensor) -> Tensor:
    """(B, ...) -> (B,) mean of squares over all non-batch elements, in float32 or wider."""
    diff = diff.float() if diff.dtype in (torch.float16, torch.bfloat16) else diff
    return diff.square().flatten(1).mean(1)


@register_objective("dmf")
class DecoupledMeanFlow(FlowMapSampling, Objective):
    """Decoupled MeanFlow fine-tuning (Lee et al. 2025); equations in the module docstring.

    Args:
        mean_fm, std_fm: the flow-matching term's logit-normal time (paper: 0, 1).
        mean_t, std_t, mean_r, std_r: the MeanFlow term's two logit-normal draws (paper: 0.4, 1 and
            −1.2, 1), sorted into t >= r.
        class_dropout: probability of the null label (paper 0.1).
        guidance: "model" (model guidance, the paper's), "teacher" (a frozen teacher's guided
            velocity) or "none".
        omega: the model-guidance scale ω (paper 0.6: effective scale 1 / (1 − ω) = 2.5).
        guidance_interval: [g_min, g_max], the times that are guided (paper [0, 0.7] at 256 px,
            [0, 0.8] at 512 px).
        teacher, teacher_guidance, teacher_guidance_interval: the frozen net of ``guidance: teacher``
            and its classifier-free guidance scale and interval (null: every t).
        logvar: learn the log-variance head λ_φ(t, r) (the paper); False keeps λ = 0, i.e.
            ℓ = log(e + c).
        logvar_c: c in ℓ = log(e·exp(−λ) + c) + λ (paper 0.01).
        logvar_features: sinusoidal features per time in the head (paper 128).
        target_fp32: guidance, JVP and targets in float32 with autocast off.
        jvp_kernel: attention inside the JVP (``onestep.backbones.attention.JVP_KERNELS``).
        sampler, time_shift: ``flow_map`` sampling ("euler" or "restart"; grid shift s, 1 at 256 px).
    """

    uses_jvp = True

    def __init__(
        self,
        mean_fm: float = 0.0,
        std_fm: float = 1.0,
        mean_t: float = 0.4,
        std_t: float = 1.0,
        mean_r: float = -1.2,
        std_r: float = 1.0,
        class_dropout: float = 0.1,
        guidance: Literal["model", "teacher", "none"] = "model",
        omega: float = 0.6,
        guidance_interval: list[float] | None = (0.0, 0.7),
        teacher: Callable[..., Tensor] | None = None,
        teacher_guidance: float = 1.0,
        teacher_guidance_interval: list[float] | None = None,
        logvar: bool = True,
        logvar_c: float = 0.01,
        logvar_features: int = 128,
        target_fp32: bool = True,
        jvp_kernel: Literal["fused", "explicit", "sdpa_math"] = "fused",
        sampler: Sampler = "euler",
        time_shift: float = 1.0,
    ):
        for name, value in (("std_fm", std_fm), ("std_t", std_t), ("std_r", std_r)):
            check_range(name, value, 0.0, low_open=True)
        check_range("class_dropout", class_dropout, 0.0, 1.0, high_open=True)
        check_choice("guidance", guidance, GUIDANCE)
        check_range("omega", omega, 0.0, 1.0, high_open=True)
        check_range("logvar_c", logvar_c, 0.0, low_open=True)
        check_range("teacher_guidance", teacher_guidance, 0.0)
        check_choice("jvp_kernel", jvp_kernel, JVP_KERNELS)
        if guidance == "teacher" and teacher is None:
            raise ValueError("guidance 'teacher' needs objective.teacher (a run, export or FORMAT:PATH)")
        if teacher is not None and guidance != "teacher":
            raise ValueError(f"objective.teacher is used by guidance 'teacher' only; got guidance {guidance!r}")
        if teacher is not None and not callable(teacher):
            raise ValueError(f"teacher must be a callable net(z, t, h, y) or None, got {type(teacher).__name__}")
        self.mean_fm, self.std_fm = float(mean_fm), float(std_fm)
        self.mean_t, self.std_t, self.mean_r, self.std_r = float(mean_t), float(std_t), float(mean_r), float(std_r)
        self.class_dropout = float(class_dropout)
        self.guidance, self.omega = guidance, float(omega)
        self.guidance_interval = check_guidance_interval("guidance_interval", guidance_interval) or (0.0, 1.0)
        self.teacher = teacher
        self.teacher_guidance = float(teacher_guidance)
        self.teacher_guidance_interval = check_guidance_interval("teacher_guidance_interval", teacher_guidance_interval)
        self.logvar_c = float(logvar_c)
        self.trainable = LogVarianceHead(logvar_features) if logvar else None
        self.target_fp32 = bool(target_fp32)
        self.jvp_kernel = jvp_kernel
        self.set_sampler(sampler, time_shift)

    # -- the pieces ---------------------------------------------------------------------------------
    @torch.no_grad()
    def guided_velocity(self, net: nn.Module, z: Tensor, t: Tensor, v: Tensor, y: Tensor | None) -> Tensor:
        """ṽ (like v): model guidance, a teacher's guided velocity, or v (module docstring)."""
        num_classes = num_classes_of(net)
        if self.guidance == "none":
            return v
        if self.guidance == "teacher":  # null labels get the teacher's unconditional velocity
            return velocity(self.teacher, z, t, y, self.teacher_guidance, self.teacher_guidance_interval).to(v.dtype)
        if num_classes == 0 or y is None or self.omega == 0.0:
            return v
        lo, hi = self.guidance_interval
        index = ((y != num_classes) & (t >= lo) & (t <= hi)).nonzero().squeeze(1)
        if index.numel() == 0:
            return v
        zi, ti, yi = z[index], t[index], y[index]
        out = net(
            torch.cat([zi, zi]),
            torch.cat([ti, ti]),
            torch.zeros_like(torch.cat([ti, ti])),
            torch.cat([yi, torch.full_like(yi, num_classes)]),
        )
        u_cond, u_null = out.to(v.dtype).chunk(2)
        return v.index_copy(0, index, v[index] + self.omega * (u_cond - u_null))

    def logvar(self, t: Tensor, r: Tensor) -> Tensor:
        """λ_φ(t, r) (B,), or zeros without the head."""
        if self.trainable is None:
            return torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32))
        return self.trainable(t, r)

    # -- the loss ------------------------------------------------------------------------------------
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
        """Per-sample DMF loss (B,); features from the flow-matching term's forward."""
        tau, t, r = dmf_times(
            x.shape[0],
            mean_fm=self.mean_fm,
            std_fm=self.std_fm,
            mean_t=self.mean_t,
            std_t=self.std_t,
            mean_r=self.mean_r,
            std_r=self.std_r,
            device=x.device,
        )
        e_fm, e_mf = torch.randn_like(x), torch.randn_like(x)
        y = drop_labels(y, num_classes_of(net), self.class_dropout)
        return self.loss_given(net, x, y, tau=tau, e_fm=e_fm, t=t, r=r, e_mf=e_mf, feature_blocks=feature_blocks)

    def loss_given(
        self,
        net: nn.Module,
        x: Tensor,
        y: Tensor | None,
        *,
        tau: Tensor,
        e_fm: Tensor,
        t: Tensor,
        r: Tensor,
        e_mf: Tensor,
        feature_blocks: tuple[int, ...] = (),
    ) -> LossOutput:
        """The loss for given times and noises and (already dropped) labels y."""
        if num_classes_of(net) == 0:
            y = None
        dtype = torch.promote_types(torch.float32 if self.target_fp32 else x.dtype, x.dtype)
        device_type = x.device.type
        precision = (
            torch.autocast(device_type=device_type, enabled=False) if self.target_fp32 else contextlib.nullcontext()
        )
        with precision:
            x32, e_fm, e_mf = x.to(dtype), e_fm.to(dtype), e_mf.to(dtype)
            tau, t, r = (a.to(device=x.device, dtype=dtype) for a in (tau, t, r))
            # Both noised samples; their guided velocities, no grad.
            z_fm, z_mf = interpolate(x32, e_fm, tau), interpolate(x32, e_mf, t)
            v_fm = self.guided_velocity(net, z_fm, tau, e_fm - x32, y)
            v_mf = self.guided_velocity(net, z_mf, t, e_mf - x32, y)
            # MeanFlow term: u and du/dt from one JVP along (ṽ, 1, 1) in (z, t, h).
            u_mf, dudt, _ = meanflow_jvp(net, z_mf, t, t - r, v_mf, y, (), self.jvp_kernel)
        u_tgt = meanflow_target(v_mf, dudt, t, r)
        err_mf = mean_squares(u_mf.to(u_tgt.dtype) - u_tgt)
        # Flow-matching term (h = 0): a plain forward under the ambient precision.
        zeros = torch.zeros_like(tau)
        if feature_blocks:
            u_fm, features = net.forward_features(z_fm.to(x.dtype), tau, zeros, y, blocks=tuple(feature_blocks))
        else:
            u_fm, features = net(z_fm.to(x.dtype), tau, zeros, y), []
        err_fm = mean_squares(u_fm.to(v_fm.dtype) - v_fm.detach())
        # Learned-variance loss on each term, half each.
        lv_fm, lv_mf = self.logvar(tau, tau), self.logvar(t, r)
        loss = 0.5 * (
            log_variance_loss(err_fm, lv_fm.to(err_fm.dtype), self.logvar_c)
            + log_variance_loss(err_mf, lv_mf.to(err_mf.dtype), self.logvar_c)
        )
        logs = {
            "mse_fm": float(err_fm.detach().mean()),
            "mse_mf": float(err_mf.detach().mean()),
            "logvar_mf": float(lv_mf.detach().mean()),
        }
        return LossOutput(loss=loss, features=list(features), logs=logs)
