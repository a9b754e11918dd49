"""MeanFlow (Geng et al. 2025, arXiv 2505.13447): learn the average velocity for one-step sampling.

Notation: x data, e ~ N(0, I) noise, times 0 <= r <= t <= 1 (noise at t = 1), h = t − r,
z_t = (1 − t) x + t e, v = e − x the conditional velocity. The network u_θ(z, t, h, y) models the
average velocity u(z_t, r, t) = 1/(t − r) ∫_r^t v(z_s, s) ds (→ v(z_t, t) as r → t).

MeanFlow identity and target:

    u(z_t, r, t) = v(z_t, t) − (t − r) · du/dt,        du/dt = v·∂_z u + ∂_t u
    u_tgt        = sg(ṽ − clip(t − r, 0, 1) · du/dt)

du/dt is one forward-mode JVP of (z, t, h) ↦ u_θ(z, t, h, y) with tangent (ṽ, 1, 1), which is the
tangent (v, 0, 1) in (z, r, t) coordinates since h = t − r. The same primal pass gives u_θ (with
gradients) and the regularizer features. Loss per sample (a sum over elements, then the adaptive
weight; ImageNet defaults p = 1, c = 0.01; CIFAR-10 used p = 0.75, c = 1e-3):

    l_i    = Σ (u_θ − u_tgt)²,      loss_i = l_i / sg((l_i + c)^p)

ṽ, the velocity in tangent and target, is v = e − x, except:

- CFG folded into training (class-conditional nets, ω ≠ 1 or κ ≠ 0), for samples whose label was
  not dropped and whose t lies in [cfg_t_start, cfg_t_end]:
      ṽ = ω·v + κ·u_θ(z_t, t, h=0 | c) + (1 − ω − κ)·u_θ(z_t, t, h=0 | ∅)
  (no grad, one batched call). Effective guidance scale ω / (1 − κ); sample with guidance 1.
- Distillation: with a ``teacher`` (a frozen net in the backbone contract) the teacher's marginal
  velocity v_φ(z_t, t) (no grad, h = 0) replaces v = e − x, also as the base of the CFG mix.

When r = t the correction vanishes and the loss is plain flow matching on those samples.

α-Flow (Zhang et al. 2025, arXiv 2510.20771; ``alpha_start`` set): for r ≠ t and 0 < α ≤ 1 the JVP
target is replaced by a discrete, self-referential one: one Euler step of size α·(t − r) with ṽ, then
the no-grad net for the rest of the interval,

    s = t − α·(t − r),  z_s = z_t − α·(t − r)·ṽ,  u_tgt = clip(α·ṽ + (1 − α)·u_θ(z_s, s, h = s − r), ±c_u)

(α = 1: trajectory flow matching, u_tgt = clip(ṽ); α = ½: a shortcut-style target; α = 0: the
MeanFlow JVP target above, exactly). α follows a sigmoid curriculum over absolute steps
[k_start, k_end]: α = α_0 + (α_1 − α_0)·sigmoid(γ·(k − (k_start + k_end)/2)/(k_end − k_start)),
α_0 before k_start and α_1 after k_end, then α < c → 0 and α > 1 − c → 1 (the authors: α_0 = 1,
α_1 = 0, γ = 25, c = 0.005). The discrete samples' loss is weighted by α (the authors' code).

Sampling: z_r = z_t − (t − r)·u_θ(z_t, t, h = t − r, y); one step is x = e − u_θ(e, t=1, h=1).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from onestep.backbones.attention import JVP_KERNELS, jvp_attention
from onestep.objectives.base import LossOutput, Objective, register_objective
from onestep.objectives.common import (
    adaptive_weight,
    cfg_velocity,
    check_adaptive,
    check_choice,
    check_guidance_interval,
    check_range,
    check_velocity_estimate,
    drop_labels,
    eager_module,
    expand_time,
    interpolate,
    num_classes_of,
    sum_squares,
    target_velocity,
    velocity,
)
from onestep.objectives.flow_map import FlowMapSampling, Sampler
from onestep.objectives.time_sampling import check_ratio, sample_t_r

__all__ = [
    "MeanFlow",
    "alpha_schedule",
    "meanflow_target",
    "meanflow_jvp",
    "adaptive_weight",
    "cfg_velocity",
    "jvp_context",
]


def jvp_context(kernel: str = "fused") -> contextlib.AbstractContextManager:
    """``jvp_attention(kernel, tangent_grad=False)``: attention with forward-mode AD for the JVP.

    du/dt only feeds the stop-gradient target, so the attention tangent needs no autograd graph.
    """
    return jvp_attention(kernel, tangent_grad=False)


def has_active_dropout(net: nn.Module) -> bool:
    """Whether a forward of ``net`` in its current mode draws a random dropout mask."""

    def active(m: nn.Module) -> bool:
        attn_drop = getattr(m, "attn_drop", 0.0)  # attention dropout kept as a probability
        return (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) or (
            isinstance(attn_drop, float) and attn_drop > 0
        )

    return net.training and any(active(m) for m in net.modules())


def meanflow_target(v: Tensor, dudt: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """Stop-gradient target sg(v − clip(t − r, 0, 1)·du/dt), in float32 (or wider); v, dudt (B, ...)."""
    dtype = torch.promote_types(torch.promote_types(v.dtype, dudt.dtype), torch.float32)
    v, dudt = v.detach().to(dtype), dudt.detach().to(dtype)
    h = expand_time((t - r).detach().to(dtype).clamp(0.0, 1.0), v)
    return v - h * dudt


def meanflow_jvp(
    net: nn.Module,
    z: Tensor,
    t: Tensor,
    h: Tensor,
    v: Tensor,
    y: Tensor | None,
    feature_blocks: tuple[int, ...] = (),
    kernel: str = "fused",
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(u_θ(z, t, h, y), du/dt, features) from one ``torch.func.jvp`` along (v, 1, 1) in (z, t, h).

    u and the features keep their graph to the parameters; du/dt is the directional derivative
    v·∂_z u + ∂_t u at fixed r (h = t − r moves with t), without a graph through attention.
    ``kernel``: the attention JVP kernel (``onestep.backbones.attention.JVP_KERNELS``).
    """
    net = eager_module(net)  # torch.func.jvp does not trace through a torch.compile wrapper
    ones = torch.ones_like(t)
    blocks = tuple(feature_blocks)
    if blocks:

        def fn(z_: Tensor, t_: Tensor, h_: Tensor) -> tuple[Tensor, list[Tensor]]:
            out, feats = net.forward_features(z_, t_, h_, y, blocks=blocks)
            return out, list(feats)

        with jvp_context(kernel):
            u, dudt, features = torch.func.jvp(fn, (z, t, h), (v, ones, ones), has_aux=True)
        return u, dudt, list(features)

    def fn(z_: Tensor, t_: Tensor, h_: Tensor) -> Tensor:
        return net(z_, t_, h_, y)

    with jvp_context(kernel):
        u, dudt = torch.func.jvp(fn, (z, t, h), (v, ones, ones))
    return u, dudt, []


def alpha_schedule(
    step: int, start: float, end: float, k_start: int, k_end: int, gamma: float = 25.0, clamp: float = 0.005
) -> float:
    """α-Flow's α at ``step``: start before k_start, end after k_end, a sigmoid in between (module
    docstring); then α < clamp → 0 and α > 1 − clamp → 1."""
    if step < k_start:
        alpha = start
    elif step > k_end:
        alpha = end
    else:
        p = (step - (k_start + k_end) / 2) / max(k_end - k_start, 1)
        alpha = start + (end - start) / (1.0 + math.exp(-gamma * p))
    if alpha < clamp:
        return 0.0
    if alpha > 1.0 - clamp:
        return 1.0
    return float(alpha)


@register_objective("meanflow")
class MeanFlow(FlowMapSampling, Objective):
    """MeanFlow (Geng et al. 2025): the average velocity, for one-step sampling; equations in the module docstring.

    Args:
        mean_t, std_t, mean_r, std_r, ratio_r_neq_t, pairing, time_dist: the (t, r) sampler
            (``time_sampling.sample_t_r``); defaults are ImageNet's: logit-normal(−0.4, 1) twice,
            sorted, 25 % of samples with r ≠ t (a fixed count per batch). CIFAR-10 v1:
            mean_t=-0.6, std_t=1.6, mean_r=-4.0, std_r=1.6, pairing="clip".
        adaptive_p, adaptive_c: adaptive weight 1 / sg((l + c)^p), ImageNet p = 1, c = 0.01
            (CIFAR-10: p = 0.75, c = 1e-3; p = 0 is plain L2).
        class_dropout: probability of the null label (conditional nets only); dropped samples get
            ṽ = v. Labels are dropped independently of the r ≠ t draw; the reference JAX code takes
            both as batch prefixes, so there a dropped-label sample is never one with r ≠ t.
        cfg_omega, cfg_kappa: ω, κ of the training-time guidance (1, 0 = off). Effective scale
            ω / (1 − κ). Paper: B/2, M/2 ω = 1, κ = 0.5; L/2, XL/2 ω = 0.2, κ = 0.92.
        cfg_t_start, cfg_t_end: guidance only for t in this closed interval.
        target_fp32: run the JVP (and so u_θ), ṽ and the target in float32 with autocast off;
            False runs the JVP under the ambient autocast (the target is still formed in float32).
        jvp_pass: how u (with gradients) and du/dt are computed for the r ≠ t samples: "joint" — u
            is the primal of the JVP itself (one pass, but the tangent's ops are recorded for autograd
            as well); "separate" — the JVP runs without any graph (du/dt only, float32) and u of every
            sample comes from one batched plain forward (the r ≠ t samples' primal is computed twice;
            the gradient-carrying pass is an ordinary forward, compile- and autocast-friendly). Same
            loss and gradients (tested in float64). A net with active dropout always uses "joint"
            (the two passes would draw different masks).
        jvp_only_r_neq_t: take the JVP only for samples with r ≠ t (a plain forward for the rest,
            whose correction is zero); False runs one JVP over the whole batch. Same loss either way.
        jvp_kernel: attention inside the JVP: "fused" (SDPA primal + its own forward-mode rule,
            default), "explicit" (softmax written out: the plain baseline) or "sdpa_math". Same
            numbers (tested); only speed and memory differ.
        jvp_tangent: the velocity along which du/dt is taken: "sample" (the paper: ṽ, built from
            v = e − x) or "model" (the net's own no-grad marginal-velocity estimate u_θ(z_t, t, 0),
            CFG-mixed like ṽ, as in Improved MeanFlow): E[v | z_t] is the same, so du/dt keeps its
            expectation while its variance drops; the target's first term stays ṽ. Costs one
            extra no-grad forward on the r ≠ t samples.
        teacher: optional frozen net (backbone contract) whose velocity v_φ(z_t, t) replaces
            v = e − x (distillation); its labels follow the same null-id convention.
        teacher_guidance: CFG scale applied to the teacher's velocity (1 = none).
        teacher_guidance_interval: [lo, hi]: guide the teacher only at times lo <= t <= hi (REPA's
            sampler guides t <= 0.7: [0, 0.7]); null (default) guides at every t.
        alpha_start, alpha_end, alpha_steps, alpha_gamma, alpha_clamp: the α-Flow curriculum (module
            docstring): α_0, α_1, [k_start, k_end] in absolute steps (so a point of a learning curve
            is a run stopped there), steepness γ and clamp c; ``alpha_start: null`` (default) is
            MeanFlow. α-Flow's settings: 1, 0, [0, total steps] (B/2; [600K, 1M] of 1.2M for XL/2),
            25, 0.005.
        alpha_weight: weight the discrete-target samples' loss by α (the authors' code; their
            paper writes α⁻¹).
        u_target_clamp: c_u, the clip of the discrete target (α-Flow: 4); null: no clip.
        loss_reduction: "sum" (MeanFlow: l = Σ over elements) or "mean" (α-Flow: the per-element
            mean; with adaptive_c 1e-3 that is the authors' loss).
        sampler, time_shift: ``flow_map`` sampling: "euler" flow-map steps (default) or "restart"
            (jump to the data, re-noise; α-Flow's 2-NFE "consistency sampling" for XL/2), and the
            grid shift.
        velocity_estimate: v itself: "conditional" (e − x, the paper) or "batch_posterior" (the
            training batch's stable-target-field estimate of E[v | z_t], ``flow_matching`` module
            docstring): the same target in expectation up to the batch's finite size, far lower
            variance on low-dimensional data. It replaces v in ṽ and so in the tangent. Not with a
            teacher (whose velocity already replaces e − x).
    """

    uses_jvp = True

    def __init__(
        self,
        mean_t: float = -0.4,
        std_t: float = 1.0,
        mean_r: float = -0.4,
        std_r: float = 1.0,
        ratio_r_neq_t: float = 0.25,
        pairing: Literal["sort", "clip"] = "sort",
        time_dist: Literal["logit_normal", "uniform"] = "logit_normal",
        adaptive_p: float = 1.0,
        adaptive_c: float = 0.01,
        class_dropout: float = 0.1,
        cfg_omega: float = 1.0,
        cfg_kappa: float = 0.0,
        cfg_t_start: float = 0.0,
        cfg_t_end: float = 1.0,
        target_fp32: bool = True,
        jvp_only_r_neq_t: bool = True,
        jvp_pass: Literal["joint", "separate"] = "joint",
        jvp_kernel: Literal["fused", "explicit", "sdpa_math"] = "fused",
        jvp_tangent: Literal["sample", "model"] = "sample",
        teacher: Callable[..., Tensor] | None = None,
        teacher_guidance: float = 1.0,
        teacher_guidance_interval: list[float] | None = None,
        velocity_estimate: Literal["conditional", "batch_posterior"] = "conditional",
        alpha_start: float | None = None,
        alpha_end: float = 0.0,
        alpha_steps: list[int] | None = None,
        alpha_gamma: float = 25.0,
        alpha_clamp: float = 0.005,
        alpha_weight: bool = True,
        u_target_clamp: float | None = None,
        loss_reduction: Literal["sum", "mean"] = "sum",
        sampler: Sampler = "euler",
        time_shift: float = 1.0,
    ):
        check_ratio(ratio_r_neq_t)
        check_choice("pairing", pairing, ("sort", "clip"))
        check_choice("time_dist", time_dist, ("logit_normal", "uniform"))
        check_choice("jvp_kernel", jvp_kernel, JVP_KERNELS)
        check_range("std_t", std_t, 0.0, low_open=True)
        check_range("std_r", std_r, 0.0, low_open=True)
        check_adaptive(adaptive_p, adaptive_c)
        check_range("class_dropout", class_dropout, 0.0, 1.0, high_open=True)
        check_range("cfg_omega", cfg_omega, 0.0)
        check_range("cfg_kappa", cfg_kappa, 0.0, 1.0, high_open=True)
        check_range("cfg_t_start", cfg_t_start, 0.0, 1.0)
        check_range("cfg_t_end", cfg_t_end, cfg_t_start, 1.0)
        check_range("teacher_guidance", teacher_guidance, 0.0)
        if teacher is not None and not callable(teacher):
            raise ValueError(f"teacher must be a callable net(z, t, h, y) or None, got {type(teacher).__name__}")
        self.mean_t, self.std_t, self.mean_r, self.std_r = float(mean_t), float(std_t), float(mean_r), float(std_r)
        self.ratio_r_neq_t = float(ratio_r_neq_t)
        self.pairing, self.time_dist = pairing, time_dist
        self.adaptive_p, self.adaptive_c = float(adaptive_p), float(adaptive_c)
        self.class_dropout = float(class_dropout)
        self.cfg_omega, self.cfg_kappa = float(cfg_omega), float(cfg_kappa)
        self.cfg_t_start, self.cfg_t_end = float(cfg_t_start), float(cfg_t_end)
        self.target_fp32 = bool(target_fp32)
        self.jvp_only_r_neq_t = bool(jvp_only_r_neq_t)
        check_choice("jvp_pass", jvp_pass, ("joint", "separate"))
        self.jvp_pass = jvp_pass
        self.jvp_kernel = jvp_kernel
        check_choice("jvp_tangent", jvp_tangent, ("sample", "model"))
        self.jvp_tangent = jvp_tangent
        self.teacher = teacher
        self.teacher_guidance = float(teacher_guidance)
        self.teacher_guidance_interval = check_guidance_interval("teacher_guidance_interval", teacher_guidance_interval)
        check_velocity_estimate(velocity_estimate)
        if teacher is not None and velocity_estimate != "conditional":
            raise ValueError(
                f"velocity_estimate={velocity_estimate!r} cannot be combined with a teacher: the "
                "teacher's velocity already replaces e − x; use 'conditional'"
            )
        self.velocity_estimate = velocity_estimate
        if alpha_start is not None:
            check_range("alpha_start", alpha_start, 0.0, 1.0)
            check_range("alpha_end", alpha_end, 0.0, 1.0)
            check_range("alpha_clamp", alpha_clamp, 0.0, 0.5)
            if (
                not isinstance(alpha_steps, (list, tuple))
                or len(alpha_steps) != 2
                or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in alpha_steps)
                or alpha_steps[0] > alpha_steps[1]
            ):
                raise ValueError(
                    f"alpha_steps must be [k_start, k_end], whole numbers 0 <= k_start <= k_end (absolute steps), "
                    f"got {alpha_steps!r}"
                )
        self.alpha_start, self.alpha_end = (None if alpha_start is None else float(alpha_start)), float(alpha_end)
        self.alpha_steps = None if alpha_steps is None else (int(alpha_steps[0]), int(alpha_steps[1]))
        self.alpha_gamma, self.alpha_clamp, self.alpha_weight = (
            float(alpha_gamma),
            float(alpha_clamp),
            bool(alpha_weight),
        )
        if u_target_clamp is not None:
            check_range("u_target_clamp", u_target_clamp, 0.0, low_open=True)
        self.u_target_clamp = None if u_target_clamp is None else float(u_target_clamp)
        check_choice("loss_reduction", loss_reduction, ("sum", "mean"))
        self.loss_reduction = loss_reduction
        self.set_sampler(sampler, time_shift)

    def alpha_at(self, step: int) -> float | None:
        """α-Flow's α at ``step`` (None: plain MeanFlow)."""
        if self.alpha_start is None:
            return None
        return alpha_schedule(
            step, self.alpha_start, self.alpha_end, *self.alpha_steps, self.alpha_gamma, self.alpha_clamp
        )

    @property
    def cfg_effective_scale(self) -> float:
        """ω / (1 − κ): the guidance scale the trained one-step model imitates."""
        return self.cfg_omega / (1.0 - self.cfg_kappa)

    def sample_t_r(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(t, r), each (n,) float32, from this objective's sampler settings."""
        return sample_t_r(
            n,
            mean_t=self.mean_t,
            std_t=self.std_t,
            mean_r=self.mean_r,
            std_r=self.std_r,
            ratio_r_neq_t=self.ratio_r_neq_t,
            pairing=self.pairing,
            dist=self.time_dist,
            generator=generator,
            device=device,
        )

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
        """Per-sample MeanFlow loss (B,), features from the JVP's primal pass."""
        # Sample t >= r and noise.
        t, r = self.sample_t_r(x.shape[0], device=x.device)
        e = torch.randn_like(x)
        # Drop labels to the null class.
        y_kept, y = y, drop_labels(y, num_classes_of(net), self.class_dropout)
        v = target_velocity(self.velocity_estimate, x, e, t, y_kept, y, num_classes_of(net))
        return self.loss_given(net, x, y, e=e, t=t, r=r, v=v, feature_blocks=feature_blocks, alpha=self.alpha_at(step))

    def loss_given(
        self,
        net: nn.Module,
        x: Tensor,
        y: Tensor | None,
        *,
        e: Tensor,
        t: Tensor,
        r: Tensor,
        v: Tensor | None = None,
        feature_blocks: tuple[int, ...] = (),
        alpha: float | None = None,
    ) -> LossOutput:
        """The loss for given noise e (like x), times t, r (B,) and (already dropped) labels y; ``v`` is
        the velocity standing for e − x (default e − x itself); ``alpha`` > 0: α-Flow's discrete
        target (None or 0: the MeanFlow JVP target)."""
        if num_classes_of(net) == 0:
            y = None
        dtype = torch.float32 if self.target_fp32 else x.dtype
        dtype = torch.promote_types(dtype, x.dtype)
        # The target side (guided velocity, tangent, JVP) in float32 with autocast off; the plain
        # forward of the r = t samples keeps the ambient autocast (bf16 training stays bf16 there).
        device_type = x.device.type
        ambient = (
            torch.autocast(device_type=device_type, dtype=torch.get_autocast_dtype(device_type))
            if torch.is_autocast_enabled(device_type)
            else contextlib.nullcontext()
        )
        precision = (
            torch.autocast(device_type=device_type, enabled=False) if self.target_fp32 else contextlib.nullcontext()
        )
        with precision:
            x, e = x.to(dtype), e.to(dtype)
            t, r = t.to(device=x.device, dtype=dtype), r.to(device=x.device, dtype=dtype)
            # Noise the data; conditional velocity.
            z = interpolate(x, e, t)
            v = e - x if v is None else v.to(dtype)
            # Guided (or teacher) velocity, no grad.
            v_tilde, guided, guided_outputs = self.guided_velocity(net, z, t, v, y, return_outputs=True)
            if alpha:
                # α-Flow: the discrete target, no JVP; u from a plain forward.
                u_tgt = self.discrete_target(net, z, t, r, v_tilde, y, alpha)
                with ambient:
                    u, features = self.plain_forward(net, z, t, t - r, y, feature_blocks)
            else:
                # The tangent velocity: ṽ, or the net's own (no-grad) velocity estimate where r != t
                # (reusing the guided samples' u_θ(·|c), u_θ(·|∅) computed for ṽ).
                v_tangent = (
                    v_tilde
                    if self.jvp_tangent == "sample"
                    else self.model_tangent(net, z, t, r, y, v_tilde, guided_outputs=guided_outputs)
                )
                # u and du/dt from a JVP along (v_tangent, 1, 1) in (z, t, h).
                u, dudt, features = self.u_and_dudt(net, z, t, r, v_tangent, y, feature_blocks, plain_precision=ambient)
        if not alpha:
            # Stop-gradient target, in float32.
            u_tgt = meanflow_target(v_tilde, dudt, t, r)
        # Per-sample sum (or mean) of squares, adaptively weighted.
        diff = u.to(u_tgt.dtype) - u_tgt
        l = sum_squares(diff) if self.loss_reduction == "sum" else sum_squares(diff) / diff[0].numel()
        loss = adaptive_weight(l, self.adaptive_p, self.adaptive_c) * l
        if alpha and self.alpha_weight:  # the discrete-target samples weigh α
            loss = torch.where(t != r, alpha * loss, loss)
        logs = {"mse": float(l.detach().mean())}
        if alpha is not None:
            logs["alpha"] = float(alpha)
        if guided is not None:
            logs["guided_fraction"] = float(guided.float().mean())
        return LossOutput(loss=loss, features=features, logs=logs)

    @torch.no_grad()
    def discrete_target(
        self, net: nn.Module, z: Tensor, t: Tensor, r: Tensor, v_tilde: Tensor, y: Tensor | None, alpha: float
    ) -> Tensor:
        """α-Flow's target (module docstring): ṽ where r = t; clip(α·ṽ + (1 − α)·u_θ(z_s, s, s − r)) with
        s = t − α(t − r), z_s = z_t − α(t − r)·ṽ elsewhere (clip(ṽ) at α = 1, no net call)."""
        target = v_tilde.clone()
        index = (t != r).nonzero().squeeze(1)
        if index.numel() == 0:
            return target
        zi, ti, ri, vi = z[index], t[index], r[index], v_tilde[index]
        step = alpha * (ti - ri)
        if alpha >= 1.0:
            moved = vi
        else:
            s = ti - step
            z_s = zi - expand_time(step, zi) * vi
            rest = net(z_s, s, s - ri, None if y is None else y[index]).to(vi.dtype)
            moved = alpha * vi + (1.0 - alpha) * rest
        if self.u_target_clamp is not None:
            moved = moved.clamp(-self.u_target_clamp, self.u_target_clamp)
        return target.index_copy(0, index, moved)

    @staticmethod
    def plain_forward(net: nn.Module, z: Tensor, t: Tensor, h: Tensor, y: Tensor | None, feature_blocks=()):
        """u_θ(z, t, h, y) with its graph, and the requested block features."""
        if feature_blocks:
            u, feats = net.forward_features(z, t, h, y, blocks=tuple(feature_blocks))
            return u, list(feats)
        return net(z, t, h, y), []

    def u_and_dudt(
        self,
        net: nn.Module,
        z: Tensor,
        t: Tensor,
        r: Tensor,
        v: Tensor,
        y: Tensor | None,
        feature_blocks: tuple[int, ...] = (),
        plain_precision=None,
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """u_θ (with graph), du/dt and features for the batch.

        With ``jvp_only_r_neq_t`` the JVP runs only on the samples with r ≠ t (25 % by default) and a
        plain forward serves the rest, whose correction term (t − r)·du/dt is zero; results are
        reassembled in batch order (du/dt = 0 where r = t), so the loss equals the all-JVP path.
        """
        moving = t != r
        n_moving = int(moving.sum())
        if self.jvp_pass == "separate" and n_moving and not has_active_dropout(net):
            return self.u_and_dudt_separate(net, z, t, r, v, y, feature_blocks, plain_precision)
        if not self.jvp_only_r_neq_t or n_moving in (0, t.shape[0]):
            return meanflow_jvp(net, z, t, t - r, v, y, feature_blocks, self.jvp_kernel)
        idx_j, idx_p = moving.nonzero().squeeze(1), (~moving).nonzero().squeeze(1)

        def take(a: Tensor | None, idx: Tensor) -> Tensor | None:
            return None if a is None else a[idx]

        # JVP on the r != t samples.
        u_j, dudt_j, feats_j = meanflow_jvp(
            net, z[idx_j], t[idx_j], (t - r)[idx_j], v[idx_j], take(y, idx_j), feature_blocks, self.jvp_kernel
        )
        # Plain forward (h = 0) on the r == t samples, under ``plain_precision`` (the caller's autocast).
        z_p, t_p, y_p = z[idx_p], t[idx_p], take(y, idx_p)
        with plain_precision if plain_precision is not None else contextlib.nullcontext():
            if feature_blocks:
                u_p, feats_p = net.forward_features(z_p, t_p, torch.zeros_like(t_p), y_p, blocks=tuple(feature_blocks))
            else:
                u_p, feats_p = net(z_p, t_p, torch.zeros_like(t_p), y_p), []
        # Back to batch order.
        inverse = torch.argsort(torch.cat([idx_j, idx_p]))
        u = torch.cat([u_j, u_p.to(u_j.dtype)])[inverse]
        dudt = torch.cat([dudt_j, torch.zeros_like(u_p, dtype=dudt_j.dtype)])[inverse]
        features = [torch.cat([a, b.to(a.dtype)])[inverse] for a, b in zip(feats_j, feats_p)]
        return u, dudt, features

    def u_and_dudt_separate(
        self,
        net: nn.Module,
        z: Tensor,
        t: Tensor,
        r: Tensor,
        v: Tensor,
        y: Tensor | None,
        feature_blocks: tuple[int, ...] = (),
        plain_precision=None,
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``jvp_pass="separate"``: du/dt from a graph-free JVP on the r ≠ t samples (all samples when
        ``jvp_only_r_neq_t`` is off), then u and the features of every sample from one batched plain
        forward with h = t − r, under ``plain_precision``."""
        index = (t != r).nonzero().squeeze(1) if self.jvp_only_r_neq_t else torch.arange(t.shape[0], device=t.device)
        h = t - r
        with torch.no_grad():
            _, dudt_j, _ = meanflow_jvp(
                net, z[index], t[index], h[index], v[index], None if y is None else y[index], (), self.jvp_kernel
            )
        dudt = torch.zeros_like(z, dtype=dudt_j.dtype).index_copy(0, index, dudt_j)
        with plain_precision if plain_precision is not None else contextlib.nullcontext():
            if feature_blocks:
                u, features = net.forward_features(z, t, h, y, blocks=tuple(feature_blocks))
                return u, dudt, list(features)
            return net(z, t, h, y), dudt, []

    @torch.no_grad()
    def model_tangent(
        self,
        net: nn.Module,
        z: Tensor,
        t: Tensor,
        r: Tensor,
        y: Tensor | None,
        v_tilde: Tensor,
        guided_outputs: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """ṽ with the samples where r ≠ t replaced by the net's velocity u_θ(z, t, 0, y), mixed for
        guided samples as ṽ is: (ω + κ)·u_θ(·|c) + (1 − ω − κ)·u_θ(·|∅).

        ``guided_outputs`` = (index, u_θ(·|c), u_θ(·|∅)) of the guided samples, as
        ``guided_velocity(..., return_outputs=True)`` computed them: those are reused, not recomputed."""
        index = (t != r).nonzero().squeeze(1)
        if index.numel() == 0:
            return v_tilde
        w = self.cfg_omega + self.cfg_kappa
        own = torch.empty_like(v_tilde[index])
        todo = torch.ones(index.numel(), dtype=torch.bool, device=index.device)
        if guided_outputs is not None and guided_outputs[0].numel():
            g_index, u_cond, u_uncond = guided_outputs
            position = torch.full((t.shape[0],), -1, dtype=torch.long, device=index.device)
            position[g_index] = torch.arange(g_index.numel(), device=index.device)
            pos = position[index]
            hit = pos >= 0
            own[hit] = (w * u_cond[pos[hit]] + (1.0 - w) * u_uncond[pos[hit]]).to(own.dtype)
            todo = ~hit
        if not bool(todo.any()):
            return v_tilde.index_copy(0, index, own)
        rest = index[todo]
        zi, ti = z[rest], t[rest]
        yi = None if y is None else y[rest]
        mine = net(zi, ti, torch.zeros_like(ti), yi).to(v_tilde.dtype)
        num_classes = num_classes_of(net)
        if num_classes and yi is not None and (self.cfg_omega != 1.0 or self.cfg_kappa != 0.0):
            guided = (yi != num_classes) & (ti >= self.cfg_t_start) & (ti <= self.cfg_t_end)
            if bool(guided.any()):
                gi = guided.nonzero().squeeze(1)
                uncond = net(zi[gi], ti[gi], torch.zeros_like(ti[gi]), torch.full_like(yi[gi], num_classes))
                mine = mine.index_copy(0, gi, w * mine[gi] + (1.0 - w) * uncond.to(mine.dtype))
        own[todo] = mine
        return v_tilde.index_copy(0, index, own)

    @torch.no_grad()
    def guided_velocity(
        self, net: nn.Module, z: Tensor, t: Tensor, v: Tensor, y: Tensor | None, return_outputs: bool = False
    ) -> tuple:
        """ṽ (like v) and the (B,) mask of guided samples (None when guidance is off); with
        ``return_outputs`` also (index, u_θ(·|c), u_θ(·|∅)) of the guided samples (or None).

        Base velocity: v, or the teacher's v_φ(z, t). Guided samples (label kept, t in
        [cfg_t_start, cfg_t_end]) get ω·base + κ·u_θ(z, t, 0 | c) + (1 − ω − κ)·u_θ(z, t, 0 | ∅).
        """
        # Replace v by the teacher velocity when distilling.
        base = (
            v
            if self.teacher is None
            else velocity(self.teacher, z, t, y, self.teacher_guidance, self.teacher_guidance_interval).to(v.dtype)
        )
        num_classes = num_classes_of(net)
        if (self.cfg_omega == 1.0 and self.cfg_kappa == 0.0) or num_classes == 0 or y is None:
            return (base, None, None) if return_outputs else (base, None)
        # Guide only kept labels with t inside the window.
        guided = (y != num_classes) & (t >= self.cfg_t_start) & (t <= self.cfg_t_end)
        index = guided.nonzero().squeeze(1)
        if index.numel() == 0:
            return (base, guided, None) if return_outputs else (base, guided)
        # One batched call: conditional and null-class u_θ(z, t, h=0).
        zi, ti, yi = z[index], t[index], y[index]
        out = net(
            torch.cat([zi, zi]),
            torch.cat([ti, ti]),
            torch.zeros_like(torch.cat([ti, ti])),
            torch.cat([yi, torch.full_like(yi, num_classes)]),
        )
        u_cond, u_uncond = out.to(v.dtype).chunk(2)
        mixed = cfg_velocity(base[index], u_cond, u_uncond, self.cfg_omega, self.cfg_kappa)
        out = base.index_copy(0, index, mixed), guided
        return (*out, (index, u_cond, u_uncond)) if return_outputs else out
