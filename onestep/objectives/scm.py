"""sCM: continuous-time consistency models in TrigFlow (Lu & Song 2024, arXiv 2410.11081), sCT and sCD,
evaluated through any onestep backbone.

Notation: x data, e ~ N(0, I), z = σ_d·e, ϑ in [0, π/2] TrigFlow time, t in [0, 1] onestep time
(noise at t = 1), z_t = (1 − t)·x + t·e, v = e − x, σ_d the data scale (default 0.5).

TrigFlow::

    x_ϑ = cos ϑ·x + sin ϑ·z,     PF-ODE  dx_ϑ/dϑ = E[cos ϑ·z − sin ϑ·x | x_ϑ] = σ_d·F(x_ϑ, ϑ)
    f(x_ϑ, ϑ) = cos ϑ·x_ϑ − σ_d sin ϑ·F_θ(x_ϑ, ϑ)           (the consistency function, f(x, 0) = x)

Matching the signal-to-noise ratio (1 − t)/t = cos ϑ/(σ_d sin ϑ) of the two paths::

    t(ϑ) = σ_d sin ϑ / (cos ϑ + σ_d sin ϑ),   ϑ(t) = atan2(t, σ_d (1 − t)),
    z_t = k(ϑ)·x_ϑ,   k(ϑ) = 1 / (cos ϑ + σ_d sin ϑ),   EDM σ = t/(1 − t) = σ_d tan ϑ.

The backbone output is read as a velocity v_θ(z_t, t) = net(z_t, t, h, y), h = 0 ("interval='zero'",
default: a flow-matching checkpoint is then the exact PF-ODE model) or h = t ("interval='t'"), and

    F_θ(x_ϑ, ϑ) = k(ϑ)·[(cos ϑ − sin ϑ/σ_d)·x_ϑ + v_θ(k x_ϑ, t(ϑ))]
                = (cos ϑ·x_ϑ − x̂)/(σ_d sin ϑ),   x̂ = z_t − t·v_θ,    so f = x̂.

Training signal dx/dϑ: sCT the conditional velocity cos ϑ·z − sin ϑ·x; sCD σ_d·F_teacher(x_ϑ, ϑ), the
frozen flow-matching teacher converted the same way (optionally guided: F is affine in v with the
same coefficient for every call, so guiding v or F is the same). Tangent (F⁻ the stop-gradient or
EMA-target model, r the warm-up factor)::

    g = −cos²ϑ·(σ_d F⁻ − dx/dϑ) − r·cos ϑ sin ϑ·(x_ϑ + σ_d·dF⁻/dϑ),     r = min(1, step/H)

(at r = 1, g = cos ϑ·df⁻/dϑ along the ODE: zero for the exact consistency function). JVP
rearrangement: one ``torch.func.jvp`` of (x_ϑ, ϑ) ↦ F⁻ with tangents (cos ϑ sin ϑ·dx/dϑ, cos ϑ sin ϑ)
returns cos ϑ sin ϑ·dF⁻/dϑ directly (bounded where dF/dϑ is large), under no_grad. Then

    g ← g / (‖g‖ + c),   c = 0.1,   ‖·‖ = L2 over all elements ("l2") or RMS ("rms")
    loss_i = e^{−w_φ(ϑ)}·p(ϑ)·d(F_θ − F⁻ − g) + w_φ(ϑ)

with d the squared norm (module-level ``scm_loss``), p the optional prior weight 1/(σ_d tan ϑ) and w_φ a
learned log-variance of ϑ (the paper writes the same loss with its weight −w_φ). Minimizing over w
gives w* = ln E[p·d | ϑ], so at the optimum the network's gradient is ∇d / E[d | ϑ]: the loss is
equalized across times. Choices and their reasons are in ``SCM``'s docstring.

Sampling: ``prior(noise) = t(ϑ_max)·noise`` (x_{ϑ_max} = σ_d sin ϑ_max·e, the data part cos ϑ_max·x
≈ 0.006·x dropped, as the papers start), each step x̂ = f(z_t), then re-noising with fresh noise to
the next time: x_{ϑ'} = cos ϑ'·x̂ + sin ϑ'·σ_d·e', i.e. z_r = (1 − r)·x̂ + r·e' in onestep's frame.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from onestep.objectives.base import LossOutput, Objective, register_objective
from onestep.objectives.common import (
    batch_time,
    check_choice,
    check_guidance_interval,
    check_range,
    drop_labels,
    eager_module,
    expand_time,
    num_classes_of,
    velocity,
)
from onestep.objectives.consistency import replayable_rng
from onestep.objectives.meanflow import jvp_context
from onestep.registry import ConfigError

__all__ = [
    "trig_to_t",
    "t_to_trig",
    "trig_scale",
    "sigma_to_trig",
    "trig_to_sigma",
    "velocity_to_trigflow",
    "trigflow_to_velocity",
    "trigflow_denoise",
    "trig_forward",
    "conditional_trig_velocity",
    "scm_jvp",
    "scm_tangent",
    "normalize_tangent",
    "tangent_warmup",
    "trig_time_proposal",
    "scm_loss",
    "TrigWeightHead",
    "SCM",
]

SIGMA_DATA = 0.5
THETA_MID = 1.1


# ----------------------------------------------------------------------------------------------
# Pure functions: time maps and conversions.


def trig_to_t(theta: Tensor, sigma_d: float = SIGMA_DATA) -> Tensor:
    """t(ϑ) = σ_d sin ϑ / (cos ϑ + σ_d sin ϑ): the onestep time with TrigFlow's SNR at ϑ."""
    s = sigma_d * torch.sin(theta)
    return s / (torch.cos(theta) + s)


def t_to_trig(t: Tensor, sigma_d: float = SIGMA_DATA) -> Tensor:
    """ϑ(t) = atan2(t, σ_d (1 − t)), the inverse of ``trig_to_t`` (t = 1 -> π/2)."""
    return torch.atan2(t, sigma_d * (1 - t))


def trig_scale(theta: Tensor, sigma_d: float = SIGMA_DATA) -> Tensor:
    """k(ϑ) = 1 / (cos ϑ + σ_d sin ϑ), with z_t = k(ϑ)·x_ϑ at t = t(ϑ)."""
    return 1.0 / (torch.cos(theta) + sigma_d * torch.sin(theta))


def sigma_to_trig(sigma: Tensor | float, sigma_d: float = SIGMA_DATA) -> Tensor | float:
    """ϑ = arctan(σ/σ_d) for an EDM noise level σ (= t/(1 − t)). Floats and tensors."""
    return torch.atan(sigma / sigma_d) if torch.is_tensor(sigma) else math.atan(sigma / sigma_d)


def trig_to_sigma(theta: Tensor, sigma_d: float = SIGMA_DATA) -> Tensor:
    """σ = σ_d tan ϑ, the EDM noise level at TrigFlow time ϑ."""
    return sigma_d * torch.tan(theta)


def _coefficients(theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """cos ϑ, sin ϑ as (B, 1, ..., 1) in x's dtype (computed in ϑ's dtype first)."""
    return expand_time(torch.cos(theta), x), expand_time(torch.sin(theta), x)


def velocity_to_trigflow(v: Tensor, x_theta: Tensor, theta: Tensor, sigma_d: float = SIGMA_DATA) -> Tensor:
    """F = k(ϑ)·[(cos ϑ − sin ϑ/σ_d)·x_ϑ + v], v the onestep velocity at (k x_ϑ, t(ϑ)). Like x_ϑ."""
    cos, sin = _coefficients(theta, x_theta)
    k = expand_time(trig_scale(theta, sigma_d), x_theta)
    return k * ((cos - sin / sigma_d) * x_theta + v.to(x_theta.dtype))


def trigflow_to_velocity(F: Tensor, x_theta: Tensor, theta: Tensor, sigma_d: float = SIGMA_DATA) -> Tensor:
    """v = F/k(ϑ) − (cos ϑ − sin ϑ/σ_d)·x_ϑ, the inverse of ``velocity_to_trigflow``."""
    cos, sin = _coefficients(theta, x_theta)
    k = expand_time(trig_scale(theta, sigma_d), x_theta)
    return F.to(x_theta.dtype) / k - (cos - sin / sigma_d) * x_theta


def trigflow_denoise(F: Tensor, x_theta: Tensor, theta: Tensor, sigma_d: float = SIGMA_DATA) -> Tensor:
    """The consistency function f = cos ϑ·x_ϑ − σ_d sin ϑ·F (= x̂ = z_t − t·v for a converted velocity)."""
    cos, sin = _coefficients(theta, x_theta)
    return cos * x_theta - sigma_d * sin * F.to(x_theta.dtype)


def conditional_trig_velocity(x: Tensor, z: Tensor, theta: Tensor) -> Tensor:
    """sCT's dx/dϑ = cos ϑ·z − sin ϑ·x (z = σ_d·e): the velocity of x_ϑ = cos ϑ·x + sin ϑ·z given x, z."""
    cos, sin = _coefficients(theta, x)
    return cos * z - sin * x


def trig_forward(
    net: nn.Module,
    x_theta: Tensor,
    theta: Tensor,
    y: Tensor | None = None,
    *,
    sigma_d: float = SIGMA_DATA,
    interval: str = "zero",
    features: tuple[int, ...] = (),
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """F_θ(x_ϑ, ϑ) from a backbone read as a velocity: v = net(k x_ϑ, t(ϑ), h, y), h = 0 ("zero") or
    t(ϑ) ("t"), converted by ``velocity_to_trigflow``. Differentiable in x_ϑ and ϑ (the JVP goes
    through the conversion). With ``features`` returns (F, [activations])."""
    t = trig_to_t(theta, sigma_d)
    h = t if interval == "t" else torch.zeros_like(t)
    z_t = expand_time(trig_scale(theta, sigma_d), x_theta) * x_theta
    if num_classes_of(net) == 0:
        y = None
    if features:
        v, feats = net.forward_features(z_t, t, h, y, blocks=tuple(features))
        return velocity_to_trigflow(v, x_theta, theta, sigma_d), list(feats)
    return velocity_to_trigflow(net(z_t, t, h, y), x_theta, theta, sigma_d)


# ----------------------------------------------------------------------------------------------
# Pure functions: the training signal.


@torch.no_grad()
def scm_jvp(
    net: nn.Module,
    x_theta: Tensor,
    theta: Tensor,
    dxdt: Tensor,
    y: Tensor | None = None,
    *,
    sigma_d: float = SIGMA_DATA,
    interval: str = "zero",
    kernel: str = "fused",
) -> tuple[Tensor, Tensor]:
    """(F⁻, cos ϑ sin ϑ·dF⁻/dϑ) from one ``torch.func.jvp`` of (x_ϑ, ϑ) ↦ F⁻ with the pre-multiplied
    tangents (cos ϑ sin ϑ·dx/dϑ, cos ϑ sin ϑ) (the JVP rearrangement), no grad, on the eager module,
    attention through ``jvp_attention(kernel, tangent_grad=False)``. dF/dϑ is the total derivative
    along the trajectory: ∂_x F·dx/dϑ + ∂_ϑ F."""
    F, jvp, _ = scm_joint_jvp(net, x_theta, theta, dxdt, y, sigma_d=sigma_d, interval=interval, kernel=kernel)
    return F, jvp


def scm_joint_jvp(
    net: nn.Module,
    x_theta: Tensor,
    theta: Tensor,
    dxdt: Tensor,
    y: Tensor | None = None,
    *,
    sigma_d: float = SIGMA_DATA,
    interval: str = "zero",
    kernel: str = "fused",
    features: tuple[int, ...] = (),
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``scm_jvp`` in the caller's grad mode: (F_θ, cos ϑ sin ϑ·dF_θ/dϑ, activations of ``features``).
    With grad enabled the primal F_θ and the activations keep their graph to the parameters (the
    online pass of the loss), while the tangent is computed without one (``tangent_grad=False``) and
    comes back detached: one pass gives the gradient-carrying F_θ and the stop-gradient target's
    tangent."""
    net = eager_module(net)
    if num_classes_of(net) == 0:
        y = None
    cs = torch.cos(theta) * torch.sin(theta)
    tangents = (expand_time(cs, dxdt) * dxdt, cs)
    blocks = tuple(features)
    with jvp_context(kernel):
        if blocks:

            def fn_features(x_: Tensor, theta_: Tensor) -> tuple[Tensor, list[Tensor]]:
                return trig_forward(net, x_, theta_, y, sigma_d=sigma_d, interval=interval, features=blocks)

            F, jvp, feats = torch.func.jvp(fn_features, (x_theta, theta), tangents, has_aux=True)
            return F, jvp.detach(), list(feats)

        def fn(x_: Tensor, theta_: Tensor) -> Tensor:
            return trig_forward(net, x_, theta_, y, sigma_d=sigma_d, interval=interval)

        F, jvp = torch.func.jvp(fn, (x_theta, theta), tangents)
    return F, jvp.detach(), []


def scm_tangent(
    F_minus: Tensor,
    dxdt: Tensor,
    x_theta: Tensor,
    jvp_scaled: Tensor,
    theta: Tensor,
    sigma_d: float = SIGMA_DATA,
    r: float = 1.0,
) -> Tensor:
    """g = −cos²ϑ·(σ_d F⁻ − dx/dϑ) − r·(cos ϑ sin ϑ·x_ϑ + σ_d·J), J = cos ϑ sin ϑ·dF⁻/dϑ (``scm_jvp``).

    Unnormalized; like x_ϑ. r = 0 leaves only the first term (tangent warm-up)."""
    cos, sin = _coefficients(theta, x_theta)
    first = -cos * cos * (sigma_d * F_minus - dxdt)
    return first - r * (cos * sin * x_theta + sigma_d * jvp_scaled)


def tangent_norm(g: Tensor, norm: str = "l2") -> Tensor:
    """(B, ...) -> (B,): ‖g‖₂ over all non-batch elements ("l2") or ‖g‖₂/√D ("rms")."""
    n = torch.linalg.vector_norm(g.flatten(1), dim=1)
    return n / math.sqrt(g[0].numel()) if norm == "rms" else n


def normalize_tangent(g: Tensor, c: float = 0.1, norm: str = "l2") -> Tensor:
    """g / (‖g‖ + c) per sample, ‖·‖ from ``tangent_norm`` ("l2" or "rms")."""
    if norm not in ("l2", "rms"):
        raise ValueError(f"tangent norm must be 'l2' or 'rms'; got {norm!r}")
    return g / expand_time(tangent_norm(g, norm) + c, g).to(g.dtype)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """r = min(1, step / H); H = 0 means no warm-up (r = 1)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, max(0, step) / warmup_steps)


def trig_time_proposal(
    n: int,
    P_mean: float = -1.0,
    P_std: float = 1.6,
    sigma_d: float = SIGMA_DATA,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n,) float64 ϑ = arctan(σ/σ_d) with ln σ ~ N(P_mean, P_std²) truncated to [σ_min, σ_max]
    (inverse-CDF sampling, so ϑ stays strictly inside (0, π/2) and nothing divides by zero)."""
    normal = torch.distributions.Normal(
        torch.tensor(P_mean, dtype=torch.float64), torch.tensor(P_std, dtype=torch.float64)
    )
    lo, hi = (
        normal.cdf(torch.tensor(math.log(sigma_min), dtype=torch.float64)),
        normal.cdf(torch.tensor(math.log(sigma_max), dtype=torch.float64)),
    )
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    log_sigma = normal.icdf((lo + (hi - lo) * u).clamp(1e-300, 1 - 1e-16))
    log_sigma = log_sigma.clamp(math.log(sigma_min), math.log(sigma_max))
    return torch.atan(torch.exp(log_sigma) / sigma_d).to(device)


def scm_loss(
    F_theta: Tensor, F_minus: Tensor, g: Tensor, w: Tensor, prior: Tensor | float = 1.0, reduction: str = "sum"
) -> tuple[Tensor, Tensor]:
    """(loss, d), each (B,) float64: d = Σ or mean over elements of (F_θ − F⁻ − g)²
    (``reduction`` "sum" or "mean"), loss = e^{−w}·prior·d + w. Gradients reach F_θ and w only."""
    diff = F_theta.double() - F_minus.detach().double() - g.detach().double()
    sq = diff.square().flatten(1)
    d = sq.sum(1) if reduction == "sum" else sq.mean(1)
    w = w.double()
    prior = prior.double() if torch.is_tensor(prior) else prior
    return torch.exp(-w) * prior * d + w, d


# ----------------------------------------------------------------------------------------------
# The learned weight.


class TrigWeightHead(nn.Module):
    """w_φ(ϑ): its own time features, then Linear -> scalar (the log-variance, loss ∝ e^{−w}).

    Features: the cosine series φ_k(ϑ) = cos(2kϑ), k = 1..K, a complete, bounded basis of smooth
    functions on [0, π/2] with resolution ~π/(2K) in ϑ (the Linear's bias is k = 0). The Linear is
    zero-initialized: w = 0, i.e. weight 1, at the start. (B,) -> (B,) in the head's dtype
    (float32 or wider); ϑ is moved to the head's device and the result back to ϑ's.
    """

    def __init__(self, num_features: int = 16):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
        self.num_features = num_features
        self.register_buffer(
            "frequencies", 2.0 * torch.arange(1, num_features + 1, dtype=torch.float32), persistent=False
        )
        self.linear = nn.Linear(num_features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def features(self, theta: Tensor) -> Tensor:
        """(B,) -> (B, K): cos(2kϑ)."""
        dtype = torch.promote_types(self.linear.weight.dtype, torch.float32)
        theta = theta.to(device=self.linear.weight.device, dtype=dtype)
        return torch.cos(theta[:, None] * self.frequencies.to(dtype)[None, :])

    def forward(self, theta: Tensor) -> Tensor:
        device = theta.device
        with torch.autocast(device_type=self.linear.weight.device.type, enabled=False):
            feats = self.features(theta)
            w = nn.functional.linear(feats, self.linear.weight.to(feats.dtype), self.linear.bias.to(feats.dtype))
        return w.squeeze(1).to(device)


# ----------------------------------------------------------------------------------------------
# Objective.


@register_objective("scm")
class SCM(Objective):
    """Continuous-time consistency models (sCT / sCD, Lu & Song 2024) in TrigFlow, over any backbone.

    Args:
        mode: "sct" (dx/dϑ = cos ϑ·z − sin ϑ·x) or "scd" (dx/dϑ = σ_d·F_teacher, needs ``teacher``).
        teacher: frozen flow-matching net v_φ(z_t, t) = net(z_t, t, h=0, y) (sCD; the recipe gives a run
            directory). Sampling and evaluation run without it.
        teacher_guidance: CFG scale of the teacher's velocity (1 = none), via ``flow_matching.velocity``.
        teacher_guidance_interval: [lo, hi]: guide the teacher only at times lo <= t <= hi (onestep's t,
            t = 1 noise); null (default) guides at every t.
        sigma_d: TrigFlow's data scale σ_d (0.5; rCM uses 1).
        interval: h given to the backbone: "zero" (default: a flow-matching checkpoint is the exact
            PF-ODE model, F = dx/dϑ/σ_d, and f its denoiser) or "t" (MeanFlow's r = 0 map).
        P_mean, P_std: ln(σ_d tan ϑ) ~ N(P_mean, P_std²). Default (−1.0, 1.6): the paper's ImageNet-64
            consistency-model setting (FastGen sCD IN-64 too); FastGen's CIFAR-10 runs use (−1.0, 1.4),
            the paper's ImageNet-512 (−0.8, 1.6).
        train_sigma_min, train_sigma_max: the proposal is truncated to σ in this range (FastGen's
            0.002, 80; its sCT CIFAR-10 run raises the top to 800), keeping ϑ inside (0, π/2).
        tangent_warmup_steps: H of r = min(1, step/H) (10 000 as in the paper and FastGen; 0 = off).
        tangent_c: c of g/(‖g‖ + c) (0.1).
        tangent_norm: "l2" (default) or "rms". The paper's Algorithm 1 and rCM use the per-sample L2
            norm over all elements; FastGen's default multiplies it by √(1/D). c = 0.1 was set for
            image-sized samples (D = 3072 for CIFAR-10 up to 16384 for ImageNet-512 latents), where
            ‖g‖₂ = √D·rms(g) ≫ 0.1 unless rms(g) ≲ 0.1/√D (≤ 2e-3): the tangent is in effect
            unit-normalized and c only guards the division. With "rms" the same c is a threshold on
            rms(g), i.e. an L2 constant of 0.1·√D ≈ 5.5 at D = 3072: tangents below that are no
            longer normalized up, a different regime from the paper's. At D = 2 the two differ by
            √2 only. "l2" reproduces the published behaviour at image scale.
        loss_reduction: d over the elements of (F_θ − F⁻ − g)²: "auto" (default: the square of the
            tangent's own norm, i.e. the sum for "l2" and the mean for "rms"), "sum" or "mean" (the
            paper's ‖·‖²/D; FastGen divides the mean by D once more, ‖·‖²/D²). With the stop-gradient
            target F_θ − F⁻ = 0, so d = ‖g‖²/(‖g‖ + c)² ∈ [0, 1) for any D under "auto" and the head's
            initialization w = 0 is already the right order; the optimum w* = ln E[p·d | ϑ] of "mean"
            with "l2" sits near −ln D (−8 at D = 3072), which a zero-initialized head reaches only after
            ~ln D / lr Adam steps, while the weighting carries no relative information. The constant
            factor changes nothing else: at the optimum the network's gradient is ∇d / E[d | ϑ].
        prior_weighting: multiply d by FastGen's prior weight 1/σ, σ = σ_d tan ϑ (default off: it is not
            in the paper's Algorithm 1; with the learned weight it cancels at the optimum, w* absorbs
            ln p(ϑ), and −ln tan ϑ is unbounded at both ends where a head on bounded features cannot
            follow it).
        adaptive_weighting: learn w_φ(ϑ) (default, the paper and FastGen) or use w = 0 (rCM).
        weight_features: K of the weight head's cosine features (``TrigWeightHead``).
        target_fp32: run the teacher, the JVP (and so F⁻) and the tangent in float32 with autocast off
            (the online F_θ keeps the ambient autocast; the loss terms are formed in float64); False
            runs the teacher and the JVP under the ambient autocast.
        jvp_kernel: attention kernel inside the JVP (``onestep.backbones.attention.JVP_KERNELS``).
        jvp_pass: "joint" — the gradient-carrying F_θ is the primal of the JVP itself (one network
            pass; the tangent is computed without a graph); "separate" — a no-grad JVP pass for the
            target, then a plain forward for F_θ (one forward more; the previous default). Same loss
            and gradients (tested in float64). "auto" (default): joint, except with an EMA
            ``target_net`` (the tangent needs θ⁻ ≠ θ) and when an autocast is active with
            ``target_fp32`` (joint would run the online pass in float32 as well).
        class_dropout: probability of the null label during training (conditional nets only). Default 0:
            labels kept, as in the sCM reference code and rCM (a null class is only needed for
            classifier-free guidance of the student; with a guided sCD teacher the null-label rows
            learn the unguided teacher).
        sigma_max: the sampler's start ϑ_max = arctan(σ_max/σ_d) (80).
        theta_mid: ϑ of the 2-step sampler's intermediate time (1.1, the paper's).

    The target model θ⁻: the stop-gradient of the online net, or ``target_net`` when the caller passes
    one to ``loss`` (an EMA copy). With the stop-gradient target, F⁻ in the residual F_θ − F⁻ − g is
    F_θ.detach() (so the residual is exactly −g whatever the precision) and F⁻ inside g is the JVP's
    float32 primal; both passes draw one dropout mask (the JVP runs on a replayed RNG fork).

    Multi-step grid (``time_grid``): ϑ_max, then ϑ evenly spaced from ϑ_max down to ``theta_mid``
    (n NFE: n − 1 intermediate times; 2 NFE: exactly ϑ_mid), then 0; mapped to onestep times.
    """

    uses_jvp = True
    stochastic_sampling = True  # multi-step sampling re-noises between steps

    def __init__(
        self,
        mode: Literal["sct", "scd"] = "sct",
        teacher: Callable[..., Tensor] | None = None,
        teacher_guidance: float = 1.0,
        teacher_guidance_interval: list[float] | None = None,
        sigma_d: float = SIGMA_DATA,
        interval: Literal["zero", "t"] = "zero",
        P_mean: float = -1.0,
        P_std: float = 1.6,
        train_sigma_min: float = 0.002,
        train_sigma_max: float = 80.0,
        tangent_warmup_steps: int = 10_000,
        tangent_c: float = 0.1,
        tangent_norm: Literal["l2", "rms"] = "l2",
        loss_reduction: Literal["auto", "sum", "mean"] = "auto",
        prior_weighting: bool = False,
        adaptive_weighting: bool = True,
        weight_features: int = 16,
        target_fp32: bool = True,
        jvp_kernel: Literal["fused", "explicit", "sdpa_math"] = "fused",
        jvp_pass: Literal["auto", "joint", "separate"] = "auto",
        class_dropout: float = 0.0,
        sigma_max: float = 80.0,
        theta_mid: float = THETA_MID,
    ):
        from onestep.backbones.attention import JVP_KERNELS

        check_choice("mode", mode, ("sct", "scd"))
        check_choice("interval", interval, ("zero", "t"))
        check_choice("tangent_norm", tangent_norm, ("l2", "rms"))
        check_choice("loss_reduction", loss_reduction, ("auto", "sum", "mean"))
        check_choice("jvp_kernel", jvp_kernel, JVP_KERNELS)
        check_choice("jvp_pass", jvp_pass, ("auto", "joint", "separate"))
        if teacher is not None and not callable(teacher):
            raise ValueError(f"teacher must be a callable net(z, t, h, y) or None, got {type(teacher).__name__}")
        if teacher is not None and mode != "scd":
            raise ValueError("teacher is only used with mode='scd' (sCT trains without one)")
        check_range("teacher_guidance", teacher_guidance, 0.0)
        check_range("sigma_d", sigma_d, 0.0, low_open=True)
        check_range("P_std", P_std, 0.0, low_open=True)
        check_range("train_sigma_min", train_sigma_min, 0.0, low_open=True)
        check_range("train_sigma_max", train_sigma_max, train_sigma_min, low_open=True)
        if not isinstance(tangent_warmup_steps, int) or tangent_warmup_steps < 0:
            raise ValueError(f"tangent_warmup_steps must be an int >= 0 (0 = no warm-up), got {tangent_warmup_steps!r}")
        check_range("tangent_c", tangent_c, 0.0, low_open=True)
        if not isinstance(weight_features, int) or weight_features < 1:
            raise ValueError(f"weight_features must be an int >= 1, got {weight_features!r}")
        check_range("class_dropout", class_dropout, 0.0, 1.0, high_open=True)
        check_range("sigma_max", sigma_max, 0.0, low_open=True)
        theta_max = sigma_to_trig(float(sigma_max), float(sigma_d))
        check_range("theta_mid", theta_mid, 0.0, theta_max, low_open=True, high_open=True)
        self.mode, self.teacher, self.teacher_guidance = mode, teacher, float(teacher_guidance)
        self.teacher_guidance_interval = check_guidance_interval("teacher_guidance_interval", teacher_guidance_interval)
        self.sigma_d, self.interval = float(sigma_d), interval
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.train_sigma_min, self.train_sigma_max = float(train_sigma_min), float(train_sigma_max)
        self.tangent_warmup_steps, self.tangent_c = tangent_warmup_steps, float(tangent_c)
        self.tangent_norm = tangent_norm
        self.loss_reduction = loss_reduction
        self.prior_weighting, self.adaptive_weighting = bool(prior_weighting), bool(adaptive_weighting)
        self.target_fp32, self.jvp_kernel, self.jvp_pass = bool(target_fp32), jvp_kernel, jvp_pass
        self.class_dropout = float(class_dropout)
        self.sigma_max, self.theta_mid = float(sigma_max), float(theta_mid)
        self.trainable = TrigWeightHead(weight_features) if adaptive_weighting else None

    # -- math --------------------------------------------------------------------------------
    @property
    def reduction(self) -> str:
        """The d reduction in effect: "sum" or "mean"."""
        if self.loss_reduction == "auto":
            return "sum" if self.tangent_norm == "l2" else "mean"
        return self.loss_reduction

    def F(
        self, net: nn.Module, x_theta: Tensor, theta: Tensor, y: Tensor | None, features: tuple[int, ...] = ()
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """F_θ(x_ϑ, ϑ) through the backbone (``trig_forward``)."""
        return trig_forward(net, x_theta, theta, y, sigma_d=self.sigma_d, interval=self.interval, features=features)

    def f(self, net: nn.Module, x_theta: Tensor, theta: Tensor, y: Tensor | None) -> Tensor:
        """The consistency function f = cos ϑ·x_ϑ − σ_d sin ϑ·F_θ."""
        return trigflow_denoise(self.F(net, x_theta, theta, y), x_theta, theta, self.sigma_d)

    def sample_theta(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """(n,) float64 ϑ from the truncated log-normal proposal."""
        return trig_time_proposal(
            n,
            self.P_mean,
            self.P_std,
            self.sigma_d,
            self.train_sigma_min,
            self.train_sigma_max,
            generator=generator,
            device=device,
        )

    def weight(self, theta: Tensor) -> Tensor:
        """w_φ(ϑ) (B,) on ϑ's device (zeros without adaptive weighting)."""
        if self.trainable is None:
            return torch.zeros_like(theta)
        return self.trainable(theta)

    def prior_weight(self, theta: Tensor) -> Tensor | float:
        """1/(σ_d tan ϑ) with ``prior_weighting``, else 1."""
        return 1.0 / trig_to_sigma(theta, self.sigma_d) if self.prior_weighting else 1.0

    def dxdt(self, x: Tensor, z: Tensor, x_theta: Tensor, theta: Tensor, y: Tensor | None) -> Tensor:
        """The training signal dx/dϑ: sCT's conditional velocity or sCD's σ_d·F_teacher (no grad)."""
        if self.mode == "sct":
            return conditional_trig_velocity(x, z, theta)
        if self.teacher is None:
            raise ConfigError(
                "scm with mode=scd needs a teacher: set objective.teacher to a flow_matching "
                "run directory or checkpoint"
            )
        t = trig_to_t(theta, self.sigma_d)
        z_t = expand_time(trig_scale(theta, self.sigma_d), x_theta) * x_theta
        y_teacher = y if num_classes_of(self.teacher) > 0 else None
        v = velocity(self.teacher, z_t, t, y_teacher, self.teacher_guidance, self.teacher_guidance_interval)
        return self.sigma_d * velocity_to_trigflow(v, x_theta, theta, self.sigma_d)

    # -- loss --------------------------------------------------------------------------------
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
        """Per-sample sCM loss (B,), features from the online F_θ pass; ``target_net`` (an EMA copy)
        replaces the stop-gradient target when given."""
        theta = self.sample_theta(x.shape[0], device=x.device)
        e = torch.randn_like(x)
        y = drop_labels(y, num_classes_of(net), self.class_dropout)
        return self.loss_given(
            net, x, y, e=e, theta=theta, step=step, feature_blocks=feature_blocks, target_net=target_net
        )

    def tangent_terms(
        self, net: nn.Module, x: Tensor, y: Tensor | None, *, e: Tensor, theta: Tensor, step: int
    ) -> dict[str, Tensor | float]:
        """The no-grad target side for noise e, times ϑ (B,) and (dropped) labels y, with ``net`` the
        target model: x_ϑ, dxdt, F_minus (the JVP primal), jvp (cos ϑ sin ϑ·dF⁻/dϑ), g_raw, g
        (normalized), r. In float32 (or x's wider dtype) with autocast off under ``target_fp32``."""
        terms, _, _ = self._terms(net, x, y, e=e, theta=theta, step=step, joint=False)
        return terms

    def joint_terms(
        self,
        net: nn.Module,
        x: Tensor,
        y: Tensor | None,
        *,
        e: Tensor,
        theta: Tensor,
        step: int,
        feature_blocks: tuple[int, ...] = (),
    ) -> tuple[dict[str, Tensor | float], Tensor, list[Tensor]]:
        """``tangent_terms`` from the online net's own pass: (terms, F_θ with its graph, features)."""
        return self._terms(net, x, y, e=e, theta=theta, step=step, joint=True, feature_blocks=feature_blocks)

    def joint_pass(self, x: Tensor, target_net: nn.Module | None) -> bool:
        """Whether ``loss_given`` takes the joint pass (``jvp_pass``)."""
        if self.jvp_pass != "auto":
            return self.jvp_pass == "joint" and target_net is None
        return target_net is None and not (torch.is_autocast_enabled(x.device.type) and self.target_fp32)

    def _terms(self, net, x, y, *, e, theta, step, joint: bool, feature_blocks: tuple[int, ...] = ()):
        dtype = torch.promote_types(torch.float32, x.dtype) if self.target_fp32 else x.dtype
        precision = (
            torch.autocast(device_type=x.device.type, enabled=False) if self.target_fp32 else contextlib.nullcontext()
        )
        with precision:
            with torch.no_grad():
                x, e = x.to(dtype), e.to(dtype)
                theta = theta.to(device=x.device, dtype=dtype)
                z = self.sigma_d * e
                cos, sin = _coefficients(theta, x)
                x_theta = cos * x + sin * z
                dxdt = self.dxdt(x, z, x_theta, theta, y).to(dtype)
            with torch.enable_grad() if joint else torch.no_grad():
                F_out, jvp, features = scm_joint_jvp(
                    net,
                    x_theta,
                    theta,
                    dxdt,
                    y,
                    sigma_d=self.sigma_d,
                    interval=self.interval,
                    kernel=self.jvp_kernel,
                    features=feature_blocks,
                )
            with torch.no_grad():
                F_minus, jvp = F_out.detach().to(dtype), jvp.to(dtype)
                r = tangent_warmup(step, self.tangent_warmup_steps)
                g_raw = scm_tangent(F_minus, dxdt, x_theta, jvp, theta, self.sigma_d, r)
                g = normalize_tangent(g_raw, self.tangent_c, self.tangent_norm)
        terms = {
            "x_theta": x_theta,
            "theta": theta,
            "dxdt": dxdt,
            "F_minus": F_minus,
            "jvp": jvp,
            "g_raw": g_raw,
            "g": g,
            "r": r,
        }
        return terms, F_out, features

    def loss_given(
        self,
        net: nn.Module,
        x: Tensor,
        y: Tensor | None,
        *,
        e: Tensor,
        theta: Tensor,
        step: int,
        feature_blocks: tuple[int, ...] = (),
        target_net: nn.Module | None = None,
    ) -> LossOutput:
        """The loss for given noise e (like x), TrigFlow times ϑ (B,) and (already dropped) labels y."""
        if num_classes_of(net) == 0:
            y = None
        if self.joint_pass(x, target_net):
            # One pass: F_θ with its graph and the tangent of the stop-gradient target.
            terms, F_theta, features = self.joint_terms(
                net, x, y, e=e, theta=theta, step=step, feature_blocks=tuple(feature_blocks)
            )
            theta_w, F_minus = terms["theta"], F_theta.detach()
        else:
            # Target side first, on a fork of the RNG: the online pass replays its dropout mask.
            with replayable_rng(x.device):
                terms = self.tangent_terms(net if target_net is None else target_net, x, y, e=e, theta=theta, step=step)
            x_theta, theta_w = terms["x_theta"], terms["theta"]
            # Online F_θ (ambient autocast), features from this pass.
            if feature_blocks:
                F_theta, features = self.F(net, x_theta, theta_w, y, tuple(feature_blocks))
            else:
                F_theta, features = self.F(net, x_theta, theta_w, y), []
            F_minus = F_theta.detach() if target_net is None else terms["F_minus"]
        # Learned log-variance and optional prior weight; loss terms in float64.
        w = self.weight(theta_w)
        loss, d = scm_loss(F_theta, F_minus, terms["g"], w, self.prior_weight(theta_w.double()), self.reduction)
        loss = loss.to(torch.promote_types(torch.float32, x.dtype))
        logs = {
            "loss": float(loss.detach().mean()),
            "distance": float(d.detach().mean()),
            "logvar": float(w.detach().float().mean()),
            "warmup": float(terms["r"]),
            "tangent_norm": float(tangent_norm(terms["g_raw"], self.tangent_norm).mean()),
        }
        return LossOutput(loss=loss, features=features, logs=logs)

    # -- sampling ----------------------------------------------------------------------------
    @property
    def theta_max(self) -> float:
        """ϑ_max = arctan(σ_max/σ_d)."""
        return sigma_to_trig(self.sigma_max, self.sigma_d)

    @property
    def t_max(self) -> float:
        """t(ϑ_max) = σ_max/(1 + σ_max)."""
        return float(trig_to_t(torch.tensor(self.theta_max, dtype=torch.float64), self.sigma_d))

    def time_thetas(self, nfe: int) -> list[float]:
        """[ϑ_max, intermediate ϑ..., 0] of length nfe + 1 (class docstring)."""
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        if nfe == 1:
            return [self.theta_max, 0.0]
        step = (self.theta_max - self.theta_mid) / (nfe - 1)
        return [self.theta_max - i * step for i in range(nfe)] + [0.0]

    def time_grid(self, nfe: int) -> Tensor:
        """The onestep times t(ϑ) of ``time_thetas(nfe)``: 1 NFE [t(ϑ_max), 0], 2 NFE [t(ϑ_max), t(ϑ_mid), 0]."""
        thetas = torch.tensor(self.time_thetas(nfe), dtype=torch.float64)
        return trig_to_t(thetas, self.sigma_d).float()

    def prior(self, noise: Tensor) -> Tensor:
        """z at t(ϑ_max): t_max·e, i.e. x_{ϑ_max} = σ_d sin ϑ_max·e mapped by k(ϑ_max)."""
        return self.t_max * noise

    @torch.no_grad()
    def sample_step(
        self,
        net: nn.Module,
        x: Tensor,
        t: Tensor | float,
        r: Tensor | float,
        y: Tensor | None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """x̂ = f(x_ϑ, ϑ) with ϑ = ϑ(t), x_ϑ = z_t/k(ϑ); where r > 0 re-noise with fresh noise e'
        (``noise`` if given, else the global RNG): z_r = (1 − r)·x̂ + r·e', which is
        x_{ϑ(r)} = cos·x̂ + sin·σ_d e' in TrigFlow."""
        t, r = batch_time(t, x), batch_time(r, x)
        theta = t_to_trig(t.double(), self.sigma_d).to(x.dtype)
        x_theta = x / expand_time(trig_scale(theta, self.sigma_d), x)
        x0 = self.f(net, x_theta, theta, y).to(x.dtype)
        if bool((r <= 0).all()):
            return x0
        r_ = expand_time(r.clamp(min=0), x)
        e = torch.randn_like(x0) if noise is None else noise.to(x0)
        return torch.where(r_ > 0, (1 - r_) * x0 + r_ * e, x0)
