"""Improved MeanFlow (iMF; "Improved Mean Flows: On the Challenges of Fastforward Generative Models",
arXiv 2512.02012; official JAX code Lyy-iiis/imeanflow: ``imf.py``, ``models/imfDiT.py``,
``configs/default.py``): MeanFlow's average velocity trained as a velocity ("v-loss") along the
network's own velocity, with classifier-free guidance as a *condition* of the network.

Notation (``objectives.common``): x data, e ~ N(0, I), 0 <= r <= t <= 1 (noise at t = 1), h = t − r,
z_t = (1 − t)·x + t·e, v_t = e − x. The network u_θ(z, t, h, y, cond) with cond = (ω, t_min, t_max)
models the average velocity over [r, t] of the guided field with scale ω applied on [t_min, t_max].

**Sampling the conditions** (``imf.py`` ``sample_tr``, ``sample_cfg_scale``, ``sample_cfg_interval``):

    t, r        = max / min of two logit-normal(−0.4, 1.0) draws; r = t on a fixed count of
                  (1 − ratio_r_neq_t)·B rows (ratio 0.5: half the batch is plain flow matching)
    ω ~ p(ω) ∝ ω^−β  on [1, 1 + s_max]      (β = 1, s_max = 7: ω ∈ [1, 8]; inverse CDF
                  ω = (1 + s_max)^u for β = 1, else [1 + u·((1 + s_max)^(1−β) − 1)]^(1/(1−β)), u ~ U(0, 1))
    t_min ~ U(0, 0.5),  t_max ~ U(0.5, 1)    per sample; forced to [0, 1] on the r = t rows
    ω̃ = ω  if t_min <= t <= t_max, else 1    (guidance only inside the interval)

**The velocity the targets use**, f(z, t, ω, y) (no grad): the network's own instantaneous velocity
at h = 0 with the dummy interval [0, 1] — the auxiliary v-head (``tangent: aux_head``, the code:
``imf.py`` ``v_cond_fn``) or the boundary u_θ(z, t, h = 0) (``tangent: boundary``, the paper's
option (a) of Tab. 1a and its Algorithm 2, no extra parameters).

**Guided target** (``imf.py`` ``guidance_fn``; class-conditional nets):

    v_c = f(z_t, t, ω̃, y),   v_u = f(z_t, t, ω_u, ∅)      (y the label *before* dropout)
    v_g = v_t + (1 − 1/ω̃)·(v_c − v_u)                       (= v_t outside the interval)

with ω_u = 1 (the code, ``imf.py`` ``v_fn`` feeds the null branch ω = 1; issue #8 of the official
repository asks why) or ω_u = ω (``uncond_omega: same``, the paper's Algorithm 2). The code's
separate r = t target v_g_fm = v_t + (1 − 1/ω)(f(ω, y) − v_u) is this same v_g, because the r = t
rows have the interval [0, 1], so ω̃ = ω there. Rows whose label is dropped get v_g = v_t.

Why (1 − 1/ω) and not MeanFlow's (ω − 1): f is conditioned on ω and trained on v_g, so at its fixed
point it is the *guided* field f(ω, y) = v_u + ω·(v_cond − v_u); then v_cond − v_u = (v_c − v_u)/ω
and MeanFlow's v_t + (ω − 1)(v_cond − v_u) becomes v_t + (1 − 1/ω)(v_c − v_u). In expectation over
x | z_t, y the target is v_u + ω̃·(v_cond − v_u), the CFG velocity (tests/test_improved_meanflow.py).

**Tangent and JVP** (``imf.py`` ``forward``): du/dt = ∂_z u·v_c + ∂_t u + ∂_h u, one forward-mode
JVP of (z, t, h) ↦ u_θ(z, t, h, y_d, cond) along (v_c, 1, 1) — the tangent (v_c, 0, 1) in (z, r, t)
— with y_d the dropped labels and cond = (ω, t_min, t_max) as sampled. The tangent is the net's own
velocity v_c (not e − x, not v_g): E[v_t | z_t] is the same, so du/dt keeps its meaning while its
variance drops. Rows whose label is dropped take v_u as tangent: their u is the null-label average
velocity, whose derivative follows the unconditional field. (In the JAX code the dropped rows are
always r = t rows, where the tangent is multiplied by h = 0; see ``label_dropout``.) The JVP runs
only on the r ≠ t rows; a plain forward serves the rest (du/dt = 0 there). On the kept r = t rows
that forward's output *is* f(ω, y) (h = 0, interval [0, 1], ω̃ = ω, the kept label: the v-head's or
the boundary u's), so the target reads v_c there instead of a second call (``target_pass: shared``;
with class dropout 0.1 the target pass shrinks from ≈ 1.7B to ≈ 1.3B rows).

**Loss** (``imf.py`` ``forward``, "v-loss"): the compound prediction

    V = u_θ + (t − r)·sg(du/dt)        l_u = Σ (V − sg(v_g))²
    loss = l_u / sg((l_u + c)^p)  [ + l_v / sg((l_v + c)^p),  l_v = Σ (v_θ − sg(v_g))² ]

p = 1, c = 0.01, each term weighted on its own; the bracket is the v-head's loss (``tangent:
aux_head``), v_θ the v-head at the training inputs (h = t − r, sampled ω and interval, dropped
labels) from the same trunk pass as u. The v-head regresses the guided v_g, as the code does
(the paper's appendix describes plain e − x): the tangent and the (1 − 1/ω) factor both assume the
v-head is the *guided* field; trained on e − x it would learn the unguided velocity and the factor
would have to be (ω − 1). With sg(du/dt), V − v_g = u_θ − (v_g − h·du/dt): the value and gradient
equal MeanFlow's u-loss with target v_g − h·du/dt; what differs is the tangent and the target.

**Unconditional data** (num_classes = 0): there is no class to guide with, v_c = v_u and v_g = v_t;
ω and the interval are still sampled and fed, so the net learns to ignore them (sampling with a
guidance input then changes nothing in expectation). Backbones without guidance conditions train
only with ``omega_s_max: 0`` (ω ≡ 1, no ``cond``).

**Sampling** (``imf.py`` ``sample_one_step``): z_r = z_t − (t − r)·u_θ(z_t, t, h = t − r, y, cond) on
linspace(1, 0, N + 1): 1 NFE x = e − u_θ(e, h = 1), 2 NFE 1 → 0.5 → 0. Guidance at sampling is the
``cond`` input {"omega": ω, "t_min", "t_max"} — one network call per step, no CFG doubling.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from onestep.backbones.attention import JVP_KERNELS
from onestep.objectives.base import LossOutput, Objective, register_objective
from onestep.objectives.common import (
    adaptive_weight,
    batch_time,
    check_adaptive,
    check_choice,
    check_range,
    check_velocity_estimate,
    eager_module,
    expand_time,
    interpolate,
    num_classes_of,
    sum_squares,
    target_velocity,
)
from onestep.objectives.meanflow import jvp_context
from onestep.objectives.time_sampling import check_ratio, sample_t_r

__all__ = ["ImprovedMeanFlow", "imf_jvp", "sample_omega", "sample_interval", "guided_target", "TANGENTS"]

TANGENTS = ("auto", "aux_head", "boundary")


# ----------------------------------------------------------------------------------------------
# Pure functions.


def sample_omega(
    n: int,
    beta: float = 1.0,
    s_max: float = 7.0,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n,) float32 guidance scales from p(ω) ∝ ω^−β on [1, 1 + s_max] by inverse CDF (module docstring)."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    top = 1.0 + s_max
    if beta == 1.0:
        omega = torch.exp(u * math.log(top))
    else:
        a = 1.0 - beta
        omega = (1.0 + u * (top**a - 1.0)) ** (1.0 / a)
    return omega.clamp(1.0, top).float()


def sample_interval(
    t: Tensor, r: Tensor, *, enabled: bool = True, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(t_min, t_max), each like t: U(0, 0.5) and U(0.5, 1) per sample, [0, 1] on the r = t rows
    (and everywhere when not ``enabled``)."""
    if not enabled:
        return torch.zeros_like(t), torch.ones_like(t)
    t_min = 0.5 * torch.rand(t.shape, generator=generator, device=t.device, dtype=torch.float32).to(t.dtype)
    t_max = 0.5 + 0.5 * torch.rand(t.shape, generator=generator, device=t.device, dtype=torch.float32).to(t.dtype)
    flow = t == r
    return torch.where(flow, torch.zeros_like(t), t_min), torch.where(flow, torch.ones_like(t), t_max)


def guided_target(v_t: Tensor, v_c: Tensor, v_u: Tensor, omega: Tensor) -> Tensor:
    """v_g = v_t + (1 − 1/ω)·(v_c − v_u), ω (B,) broadcast against the (B, ...) velocities."""
    return v_t + expand_time(1.0 - 1.0 / omega, v_t) * (v_c - v_u)


def _unwrap_attr(net: nn.Module, name: str, default: Any) -> Any:
    """``net.<name>``, looking through ``torch.compile`` (``_orig_mod``) and ``.module`` wrappers."""
    net = eager_module(net)
    while not hasattr(net, name) and hasattr(net, "module"):
        net = net.module
    return getattr(net, name, default)


def _call(net: nn.Module, z: Tensor, t: Tensor, h: Tensor, y: Tensor | None, cond: dict | None) -> Tensor:
    return net(z, t, h, y) if cond is None else net(z, t, h, y, cond=cond)


def _rows(mask: Tensor, x: Tensor) -> Tensor:
    """A (B,) bool mask shaped (B, 1, ..., 1) against x."""
    return mask.reshape(x.shape[0], *([1] * (x.ndim - 1)))


def _take(cond: dict[str, Tensor] | None, idx: Tensor) -> dict[str, Tensor] | None:
    return None if cond is None else {k: v[idx] for k, v in cond.items()}


def imf_jvp(
    net: nn.Module,
    z: Tensor,
    t: Tensor,
    h: Tensor,
    tangent: Tensor,
    y: Tensor | None,
    cond: dict[str, Tensor] | None = None,
    *,
    aux: bool = False,
    feature_blocks: tuple[int, ...] = (),
    kernel: str = "fused",
) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor]]:
    """(u, du/dt, v, features) from one ``torch.func.jvp`` of (z, t, h) ↦ u_θ(z, t, h, y, cond) along
    (tangent, 1, 1), on the eager module inside ``jvp_attention(kernel, tangent_grad=False)``.

    u, v (the v-head's output at the same inputs, with ``aux``; else None) and the features keep
    their graph to the parameters; du/dt has none through attention (it only feeds a stop-gradient)."""
    net = eager_module(net)
    ones = torch.ones_like(t)
    blocks = tuple(feature_blocks)

    def fn(z_: Tensor, t_: Tensor, h_: Tensor):  # aux: [v, *features] or [*features]
        if aux:
            u, v, feats = net.forward_aux(z_, t_, h_, y, cond=cond, blocks=blocks)
            return u, [v, *feats]
        if blocks:
            u, feats = (
                net.forward_features(z_, t_, h_, y, blocks=blocks, cond=cond)
                if cond is not None
                else net.forward_features(z_, t_, h_, y, blocks=blocks)
            )
            return u, list(feats)
        return _call(net, z_, t_, h_, y, cond), []

    with jvp_context(kernel):
        u, dudt, extra = torch.func.jvp(fn, (z, t, h), (tangent, ones, ones), has_aux=True)
    extra = list(extra)
    v = extra.pop(0) if aux else None
    return u, dudt, v, extra


# ----------------------------------------------------------------------------------------------
# The objective.


@register_objective("improved_meanflow")
class ImprovedMeanFlow(Objective):
    """Improved MeanFlow (module docstring for the equations and the choices where paper and code differ).

    Args:
        tangent: the net's own velocity used as JVP tangent and in the guided target: "aux_head"
            (the v-head of a backbone with ``has_aux_head``, e.g. ``imf_dit_*``; adds the v-head loss),
            "boundary" (u_θ at h = 0; any backbone) or "auto" (default: "aux_head" when the backbone has
            a v-head, else "boundary").
        omega_beta, omega_s_max: the guidance prior p(ω) ∝ ω^−β on [1, 1 + s_max] (β = 1, s_max = 7).
            ``omega_s_max: 0`` trains without guidance (ω ≡ 1), also on backbones without guidance
            conditions.
        guidance_interval: sample [t_min, t_max] per sample (default) or always use [0, 1].
        uncond_omega: the ω of the null-label velocity v_u: "one" (the code) or "same" (the paper's
            Algorithm 2: the sample's ω).
        ratio_r_neq_t, mean_t, std_t, mean_r, std_r, pairing, time_dist: the (t, r) sampler
            (``time_sampling.sample_t_r``); iMF: 50 % of rows with r ≠ t, logit-normal(−0.4, 1.0), sorted.
        class_dropout: probability of the null label (class-conditional nets).
        label_dropout: where dropped labels go: "random" (each row with probability class_dropout,
            default) or "reference" (the JAX code: Binomial(B, class_dropout) rows, taken from the r = t
            rows first, since the code drops the first rows of the batch, which are its r = t half).
        adaptive_p, adaptive_c: the adaptive weight 1 / sg((l + c)^p) of each loss term (1, 0.01).
        velocity_estimate: v_t itself: "conditional" (e − x, the paper) or "batch_posterior" (the
            batch's estimate of E[e − x | z_t], ``objectives.common``): lower variance in few dimensions.
        target_fp32: run the JVP (and so u_θ), the targets and the loss in float32 with autocast off.
        jvp_only_r_neq_t: take the JVP on the r ≠ t rows only (a plain forward for the rest).
        jvp_kernel: attention inside the JVP ("fused", "explicit", "sdpa_math"; same numbers).
        target_pass: "shared" (default): on the kept r = t rows whose interval is [0, 1] the target's
            v_c = f(ω, y) has exactly the inputs of the training forward (h = 0, ω̃ = ω, interval
            [0, 1], the kept label), so it is read off that forward (detached) instead of a second
            call; "separate": every target row gets its own no-grad call (the same numbers).
    """

    uses_jvp = True
    #: ``sample_step`` takes ``cond`` (guidance scale and interval as network inputs).
    accepts_cond = True

    def __init__(
        self,
        tangent: Literal["auto", "aux_head", "boundary"] = "auto",
        omega_beta: float = 1.0,
        omega_s_max: float = 7.0,
        guidance_interval: bool = True,
        uncond_omega: Literal["one", "same"] = "one",
        ratio_r_neq_t: float = 0.5,
        mean_t: float = -0.4,
        std_t: float = 1.0,
        mean_r: float = -0.4,
        std_r: float = 1.0,
        pairing: Literal["sort", "clip"] = "sort",
        time_dist: Literal["logit_normal", "uniform"] = "logit_normal",
        class_dropout: float = 0.1,
        label_dropout: Literal["random", "reference"] = "random",
        adaptive_p: float = 1.0,
        adaptive_c: float = 0.01,
        velocity_estimate: Literal["conditional", "batch_posterior"] = "conditional",
        target_fp32: bool = True,
        jvp_only_r_neq_t: bool = True,
        jvp_kernel: Literal["fused", "explicit", "sdpa_math"] = "fused",
        target_pass: Literal["shared", "separate"] = "shared",
    ):
        check_choice("tangent", tangent, TANGENTS)
        check_range("omega_beta", omega_beta, 0.0)
        check_range("omega_s_max", omega_s_max, 0.0)
        check_choice("uncond_omega", uncond_omega, ("one", "same"))
        check_ratio(ratio_r_neq_t)
        check_range("std_t", std_t, 0.0, low_open=True)
        check_range("std_r", std_r, 0.0, low_open=True)
        check_choice("pairing", pairing, ("sort", "clip"))
        check_choice("time_dist", time_dist, ("logit_normal", "uniform"))
        check_range("class_dropout", class_dropout, 0.0, 1.0, high_open=True)
        check_choice("label_dropout", label_dropout, ("random", "reference"))
        check_adaptive(adaptive_p, adaptive_c)
        check_velocity_estimate(velocity_estimate)
        check_choice("jvp_kernel", jvp_kernel, JVP_KERNELS)
        check_choice("target_pass", target_pass, ("shared", "separate"))
        self.tangent = tangent
        self.omega_beta, self.omega_s_max = float(omega_beta), float(omega_s_max)
        self.guidance_interval = bool(guidance_interval)
        self.uncond_omega = uncond_omega
        self.ratio_r_neq_t = float(ratio_r_neq_t)
        self.mean_t, self.std_t, self.mean_r, self.std_r = float(mean_t), float(std_t), float(mean_r), float(std_r)
        self.pairing, self.time_dist = pairing, time_dist
        self.class_dropout, self.label_dropout = float(class_dropout), label_dropout
        self.adaptive_p, self.adaptive_c = float(adaptive_p), float(adaptive_c)
        self.velocity_estimate = velocity_estimate
        self.target_fp32 = bool(target_fp32)
        self.jvp_only_r_neq_t = bool(jvp_only_r_neq_t)
        self.jvp_kernel = jvp_kernel
        self.target_pass = target_pass

    # -- the backbone ---------------------------------------------------------------------------
    def tangent_source(self, net: nn.Module) -> str:
        """ "aux_head" or "boundary" for this backbone (``tangent: auto`` resolved)."""
        if self.tangent == "auto":
            return "aux_head" if _unwrap_attr(net, "has_aux_head", False) else "boundary"
        return self.tangent

    def check_backbone(self, net: nn.Module) -> None:
        """ValueError (one line) if ``net`` cannot be trained with these settings."""
        name = type(eager_module(net)).__name__
        if self.tangent == "aux_head" and not _unwrap_attr(net, "has_aux_head", False):
            raise ValueError(
                f"improved_meanflow tangent='aux_head' needs a backbone with an auxiliary v-head "
                f"(imf_dit_* with aux_head: true); {name} has none: use tangent: boundary (or auto)"
            )
        if self.omega_s_max > 0 and not _unwrap_attr(net, "cond_keys", ()):
            raise ValueError(
                f"improved_meanflow conditions the network on the guidance scale and interval, but "
                f"{name} was built without guidance conditions: set backbone guidance_conditions: true "
                f"(dit, mlp_toy, unet; imf_dit_* always has them), or objective omega_s_max: 0 to "
                f"train without guidance"
            )

    # -- sampling the training inputs --------------------------------------------------------------
    def sample_t_r(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(t, r), each (n,) float32."""
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

    def sample_conditions(
        self, t: Tensor, r: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(ω, t_min, t_max), each like t."""
        if self.omega_s_max > 0:
            omega = sample_omega(
                t.shape[0], self.omega_beta, self.omega_s_max, generator=generator, device=t.device
            ).to(t.dtype)
        else:
            omega = torch.ones_like(t)
        t_min, t_max = sample_interval(t, r, enabled=self.guidance_interval, generator=generator)
        return omega, t_min, t_max

    def keep_labels(self, n: int, t: Tensor, r: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(n,) bool, False where the label is dropped to the null class (``label_dropout``)."""
        drop = torch.rand(n, generator=generator, device=t.device) < self.class_dropout
        if self.label_dropout == "reference":
            # As many rows (Binomial(n, p)), moved to the r = t rows first (in random order), then r != t.
            order = torch.argsort((t != r).float() + 0.5 * torch.rand(n, generator=generator, device=t.device))
            count = int(drop.sum())
            drop = torch.zeros(n, dtype=torch.bool, device=t.device)
            drop[order[:count]] = True
        return ~drop

    # -- the loss ------------------------------------------------------------------------------
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
        """Per-sample iMF loss (B,), features from the u path of the gradient-carrying pass."""
        self.check_backbone(net)
        n = x.shape[0]
        t, r = self.sample_t_r(n, device=x.device)
        e = torch.randn_like(x)
        omega, t_min, t_max = self.sample_conditions(t, r)
        num_classes = num_classes_of(net)
        conditional = num_classes > 0 and y is not None
        keep = self.keep_labels(n, t, r) if conditional else None
        v = None
        if self.velocity_estimate != "conditional":
            y_d = None if keep is None else torch.where(keep, y, torch.full_like(y, num_classes))
            v = target_velocity(self.velocity_estimate, x, e, t, y, y_d, num_classes)
        return self.loss_given(
            net,
            x,
            y,
            e=e,
            t=t,
            r=r,
            omega=omega,
            t_min=t_min,
            t_max=t_max,
            keep=keep,
            v=v,
            feature_blocks=feature_blocks,
        )

    def loss_given(
        self,
        net: nn.Module,
        x: Tensor,
        y: Tensor | None,
        *,
        e: Tensor,
        t: Tensor,
        r: Tensor,
        omega: Tensor,
        t_min: Tensor,
        t_max: Tensor,
        keep: Tensor | None = None,
        v: Tensor | None = None,
        feature_blocks: tuple[int, ...] = (),
    ) -> LossOutput:
        """The loss for given noise e, times t, r, conditions ω, t_min, t_max (each (B,)), labels y
        *before* dropout and ``keep`` (B,) bool (False: dropped to the null class; None: all kept).
        ``v`` stands for e − x (default e − x itself)."""
        self.check_backbone(net)
        num_classes = num_classes_of(net)
        if num_classes == 0:
            y = keep = None
        source = self.tangent_source(net)
        guided_net = bool(_unwrap_attr(net, "cond_keys", ()))
        dtype = torch.promote_types(torch.float32 if self.target_fp32 else x.dtype, x.dtype)
        precision = (
            torch.autocast(device_type=x.device.type, enabled=False) if self.target_fp32 else contextlib.nullcontext()
        )
        with precision:
            x, e = x.to(dtype), e.to(dtype)
            t, r, omega, t_min, t_max = (a.to(device=x.device, dtype=dtype) for a in (t, r, omega, t_min, t_max))
            z = interpolate(x, e, t)
            v_t = e - x if v is None else v.to(dtype)
            # The rows whose target v_c the training forward gives for free (``target_pass``).
            shared = self.shared_rows(t, r, y, keep, t_min, t_max, guided_net)
            # Guided target v_g and the tangent, both from the net's own velocity (no grad).
            v_c, v_u, tangent, guided, omega_t = self.velocities(
                net, z, t, r, v_t, y, keep, omega, t_min, t_max, source, guided_net, skip_c=shared
            )
            # u (and the v-head's v) at the training inputs with the dropped labels, du/dt along the tangent.
            y_d = None if y is None else (y if keep is None else torch.where(keep, y, torch.full_like(y, num_classes)))
            cond = {"omega": omega, "t_min": t_min, "t_max": t_max} if guided_net else None
            u, dudt, v_head, features = self.u_dudt(
                net, z, t, r, tangent, y_d, cond, source == "aux_head", feature_blocks
            )
            if shared is not None:  # f(ω, y) at h = 0 on [0, 1]: the training output on these rows
                own = (v_head if source == "aux_head" else u).detach().to(v_c.dtype)
                v_c = torch.where(_rows(shared, v_c), own, v_c)
            v_g = v_t if y is None else torch.where(_rows(guided, v_t), guided_target(v_t, v_c, v_u, omega_t), v_t)
        # The compound prediction V = u + (t − r)·sg(du/dt) against sg(v_g), in float32 or wider.
        work = torch.promote_types(torch.promote_types(u.dtype, v_g.dtype), torch.float32)
        h = expand_time((t - r).detach().to(work), v_g)
        target = v_g.detach().to(work)
        big_v = u.to(work) + h * dudt.detach().to(work)
        l_u = sum_squares(big_v - target)
        loss = adaptive_weight(l_u, self.adaptive_p, self.adaptive_c) * l_u
        logs = {"mse": float(l_u.detach().mean())}
        if v_head is not None:
            l_v = sum_squares(v_head.to(work) - target)
            loss = loss + adaptive_weight(l_v, self.adaptive_p, self.adaptive_c) * l_v
            logs["mse_v"] = float(l_v.detach().mean())
        if y is not None:
            logs["guided_fraction"] = float(guided.float().mean())
        return LossOutput(loss=loss, features=features, logs=logs)

    @torch.no_grad()
    def velocity(
        self, net: nn.Module, z: Tensor, t: Tensor, omega: Tensor, y: Tensor | None, source: str, guided_net: bool
    ) -> Tensor:
        """f(z, t, ω, y): the net's instantaneous velocity at h = 0 and interval [0, 1] (v-head or boundary u)."""
        h = torch.zeros_like(t)
        cond = {"omega": omega, "t_min": torch.zeros_like(t), "t_max": torch.ones_like(t)} if guided_net else None
        if source == "aux_head":
            forward_v = _unwrap_attr(net, "forward_v", None)
            if forward_v is not None:
                return forward_v(z, t, h, y, cond=cond)
            return _unwrap_attr(net, "forward_aux", None)(z, t, h, y, cond=cond)[1]
        return _call(net, z, t, h, y, cond)

    def shared_rows(
        self,
        t: Tensor,
        r: Tensor,
        y: Tensor | None,
        keep: Tensor | None,
        t_min: Tensor,
        t_max: Tensor,
        guided_net: bool,
    ) -> Tensor | None:
        """(B,) bool: the rows whose target v_c is read off the training forward (``target_pass:
        shared``), or None. They are the kept r = t rows with interval [0, 1] (the interval every
        r = t row gets): there the training forward's inputs (h = 0, ω, [0, 1], the kept label) are
        exactly f(ω̃, y)'s. Needs the plain forward on the r = t rows (``jvp_only_r_neq_t``)."""
        if self.target_pass != "shared" or not self.jvp_only_r_neq_t or y is None:
            return None
        rows = t == r
        if keep is not None:
            rows = rows & keep
        if guided_net:
            rows = rows & (t_min == 0) & (t_max == 1)
        return rows if bool(rows.any()) else None

    @torch.no_grad()
    def targets(
        self,
        net: nn.Module,
        z: Tensor,
        t: Tensor,
        r: Tensor,
        v_t: Tensor,
        y: Tensor | None,
        keep: Tensor | None,
        omega: Tensor,
        t_min: Tensor,
        t_max: Tensor,
        source: str,
        guided_net: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(v_g, tangent, guided): the guided target and the JVP tangent (both like v_t), and the (B,)
        mask of rows whose guidance term is on (label kept, ω̃ > 1), every row from its own no-grad call."""
        v_c, v_u, tangent, guided, omega_t = self.velocities(
            net, z, t, r, v_t, y, keep, omega, t_min, t_max, source, guided_net
        )
        if y is None:
            return v_t, tangent, guided
        return torch.where(_rows(guided, v_t), guided_target(v_t, v_c, v_u, omega_t), v_t), tangent, guided

    @torch.no_grad()
    def velocities(
        self,
        net: nn.Module,
        z: Tensor,
        t: Tensor,
        r: Tensor,
        v_t: Tensor,
        y: Tensor | None,
        keep: Tensor | None,
        omega: Tensor,
        t_min: Tensor,
        t_max: Tensor,
        source: str,
        guided_net: bool,
        skip_c: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(v_c, v_u, tangent, guided, ω̃): the net's velocities the target and the tangent need (zero
        on rows that need none), the (B,) mask of rows whose guidance term is on (label kept, ω̃ > 1)
        and the interval-masked ω.

        Only the rows that need them go through the net, in one batched call: v_c = f(ω̃, y) on the
        guided rows and the kept r ≠ t rows (tangent), v_u = f(ω_u, ∅) on the guided rows and the dropped
        r ≠ t rows (tangent). Rows outside [t_min, t_max], or with ω = 1, have v_g = v_t exactly.
        ``skip_c`` (B,) bool: r = t rows whose v_c the caller fills in (left zero here)."""
        moving = t != r
        omega_t = torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))
        tangent = torch.zeros_like(v_t)
        v_c, v_u = torch.zeros_like(v_t), torch.zeros_like(v_t)
        if y is None:  # unconditional: v_c = v_u, so v_g = v_t; the tangent is f(ω̃) on the r != t rows
            idx = moving.nonzero().squeeze(1)
            if idx.numel():
                tangent[idx] = self.velocity(net, z[idx], t[idx], omega_t[idx], None, source, guided_net).to(v_t.dtype)
            return v_c, v_u, tangent, torch.zeros_like(moving), omega_t
        num_classes = num_classes_of(net)
        keep = torch.ones_like(moving) if keep is None else keep
        guided = keep & (omega_t != 1)
        need_c = guided | (keep & moving)
        if skip_c is not None:
            need_c = need_c & ~(skip_c & ~moving)
        idx_c = need_c.nonzero().squeeze(1)
        idx_u = (guided | (~keep & moving)).nonzero().squeeze(1)
        n_c = idx_c.numel()
        if n_c + idx_u.numel() == 0:
            return v_c, v_u, tangent, guided, omega_t
        omega_u = torch.ones_like(omega) if self.uncond_omega == "one" else omega
        index = torch.cat([idx_c, idx_u])
        labels = torch.cat([y[idx_c], torch.full_like(y[idx_u], num_classes)])
        out = self.velocity(
            net, z[index], t[index], torch.cat([omega_t[idx_c], omega_u[idx_u]]), labels, source, guided_net
        ).to(v_t.dtype)
        v_c[idx_c], v_u[idx_u] = out[:n_c], out[n_c:]
        tangent = torch.where(_rows(keep, v_t), v_c, v_u)
        return v_c, v_u, tangent, guided, omega_t

    def u_dudt(
        self,
        net: nn.Module,
        z: Tensor,
        t: Tensor,
        r: Tensor,
        tangent: Tensor,
        y: Tensor | None,
        cond: dict[str, Tensor] | None,
        aux: bool,
        feature_blocks: tuple[int, ...] = (),
    ) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor]]:
        """(u with graph, du/dt, v-head output with graph or None, features), in batch order.

        With ``jvp_only_r_neq_t`` the JVP runs on the r ≠ t rows and a plain forward on the rest
        (du/dt = 0 there: its factor t − r is 0)."""
        moving = t != r
        n_moving = int(moving.sum())
        h = t - r
        if n_moving == t.shape[0] or (not self.jvp_only_r_neq_t and n_moving > 0):
            return imf_jvp(
                net, z, t, h, tangent, y, cond, aux=aux, feature_blocks=feature_blocks, kernel=self.jvp_kernel
            )
        idx_j, idx_p = moving.nonzero().squeeze(1), (~moving).nonzero().squeeze(1)
        take = lambda a, idx: None if a is None else a[idx]  # noqa: E731
        parts = []
        if n_moving:
            parts.append(
                imf_jvp(
                    net,
                    z[idx_j],
                    t[idx_j],
                    h[idx_j],
                    tangent[idx_j],
                    take(y, idx_j),
                    _take(cond, idx_j),
                    aux=aux,
                    feature_blocks=feature_blocks,
                    kernel=self.jvp_kernel,
                )
            )
        z_p, t_p, y_p, c_p = z[idx_p], t[idx_p], take(y, idx_p), _take(cond, idx_p)
        h_p = torch.zeros_like(t_p)
        if aux:
            u_p, v_p, f_p = _unwrap_attr(net, "forward_aux", None)(
                z_p, t_p, h_p, y_p, cond=c_p, blocks=tuple(feature_blocks)
            )
        elif feature_blocks:
            u_p, f_p = (
                net.forward_features(z_p, t_p, h_p, y_p, blocks=tuple(feature_blocks), cond=c_p)
                if c_p is not None
                else net.forward_features(z_p, t_p, h_p, y_p, blocks=tuple(feature_blocks))
            )
            v_p = None
        else:
            u_p, v_p, f_p = _call(net, z_p, t_p, h_p, y_p, c_p), None, []
        if not parts:
            return u_p, torch.zeros_like(u_p), v_p, list(f_p)
        u_j, dudt_j, v_j, f_j = parts[0]
        inverse = torch.argsort(torch.cat([idx_j, idx_p]))
        u = torch.cat([u_j, u_p.to(u_j.dtype)])[inverse]
        dudt = torch.cat([dudt_j, torch.zeros_like(u_p, dtype=dudt_j.dtype)])[inverse]
        v = None if v_j is None else torch.cat([v_j, v_p.to(v_j.dtype)])[inverse]
        features = [torch.cat([a, b.to(a.dtype)])[inverse] for a, b in zip(f_j, f_p)]
        return u, dudt, v, features

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_step(
        self,
        net: nn.Module,
        x: Tensor,
        t: Tensor | float,
        r: Tensor | float,
        y: Tensor | None,
        cond: dict[str, Any] | None = None,
    ) -> Tensor:
        """z_r = z_t − (t − r)·u_θ(z_t, t, h = t − r, y, cond); ``cond`` = {"omega", "t_min", "t_max"}
        (None: the backbone's defaults ω = 1 on [0, 1], i.e. unguided)."""
        t, r = batch_time(t, x), batch_time(r, x)
        if num_classes_of(net) == 0:
            y = None
        return x - expand_time(t - r, x) * _call(net, x, t, t - r, y, cond)
