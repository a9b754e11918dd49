"""Consistency models: consistency training (CT / iCT) and consistency distillation (CD), in the
linear-path convention the whole package uses, and the machinery easy consistency tuning (ECT,
``onestep.objectives.ect``) shares with them. The pure math is in ``consistency_math``.

Notation: x data, e ~ N(0, I) noise, t in [0, 1] (noise at t = 1), z_t = (1 − t) x + t e, y labels,
F_θ(z, t, h, y) the backbone output (a velocity-like quantity), h its interval input.

Parametrization (boundary condition by construction)::

    f_θ(z_t, t) = z_t − t · F_θ(z_t, t, h, y),     h = t ("interval='t'") or h = 0 ("interval='zero'")

With h = t this is exactly MeanFlow's one-step map z_0 = z_t − (t − r)·u_θ(z_t, t, h = t − r) at
r = 0, so MeanFlow, flow-matching and consistency runs share backbones, checkpoints and the sampler;
f_θ(z, 0) = z for every net. With h = 0, F is a flow-matching velocity and a flow-matching
checkpoint gives, before any tuning, f = z − t·v(z, t) = E[x | z_t] (the denoiser): ECT's
"start from a pretrained diffusion model" (``ect`` defaults to this).

Time map to the EDM σ-grid (x_σ = x + σ e, σ in [σ_min, σ_max])::

    σ = t / (1 − t),   t = σ / (1 + σ),   z_t = (1 − t) · x_σ

Grids are Karras grids in σ (σ_min = 0.002, σ_max = 80, ρ = 7), σ_1 < ... < σ_N, mapped to t; all
σ-valued quantities of the papers (the lognormal index distribution, the weights 1/(σ_{i+1} − σ_i),
ECT's r(t) mapping) are computed in σ exactly as published, then mapped to t for the network.

Losses (per sample, d a distance on the flattened sample, Δ = f_θ(z_hi) − sg f_θ⁻(z_lo))::

    pseudo-Huber  d = √(‖Δ‖² + c²) − c        (iCT: c = 0.00054·√dim; c = 0 gives ‖Δ‖)
    l2            d = ‖Δ‖²                    (the CT paper's squared ℓ2 metric)

- ``consistency_training`` (iCT defaults): index i ~ discretized lognormal over the grid,
  z_hi = z_{t(σ_{i+1})}, z_lo = z_{t(σ_i)} with the SAME noise e, θ⁻ = sg θ, weight
  1/(σ_{i+1} − σ_i), N(k) = min(s0·2^⌊k/K'⌋, s1) + 1 (s0 = 10, s1 = 1280,
  K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋, K = ``total_steps``). ``schedule="ct"`` switches to the original
  CT: N(k) = ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉ + 1 (s0 = 2, s1 = 150), uniform index, weight 1;
  ``target="ema"`` uses an EMA target with μ(k) = exp(s0·log μ0 / N(k)).
- ``consistency_distillation``: z_lo is one Heun (or Euler) step of a frozen teacher's probability
  flow ODE dz/dt = v_φ(z, t) from t_hi to t_lo, so z_lo lies on z_hi's teacher trajectory; fixed
  grid (N = 18), by default with iCT's index distribution, weighting and metric.
- ``ect``: continuous times; σ_t ~ lognormal(P_mean, P_std), σ_r = σ_t·(1 − q^{−(stage+1)}·n(σ_t)),
  n(σ) = 1 + k·sigmoid(−b·σ) (k = 8, b = 1), stage = ⌊step / stage_steps⌋ — all in ECT's EDM σ
  convention (their "t" is σ); σ_r ≤ 0 means the target is the data x. Loss
  (√(‖Δ‖² + c²) − c) / (σ_t − σ_r), c = 0 by default (the un-squared ℓ2 norm).

Target and online pass share one dropout mask (the target is computed first, inside a forked RNG
state that the online pass then replays), as in the ECT code. Labels pass through with class
dropout to the null id ``num_classes`` like flow matching.

EMA target (``target="ema"``): the objective only declares the decay μ(k) (``target_decay``); the
training loop owns θ⁻ (a frozen copy of the network made at the start), updates it after optimizer
step k as θ⁻ ← μ(k)·θ⁻ + (1 − μ(k))·θ (buffers copied), saves it in checkpoints and passes it to
``loss`` as ``target_net``. Called without a ``target_net`` (outside the loop), θ⁻ = θ.

Multi-step sampling: x_0 = f_θ(x_t, t); if r > 0, re-noise with fresh noise: x_r = (1 − r)·x_0 + r·e'
(e' from the global RNG). ``time_grid``: 1 NFE [t(σ_max), 0]; 2 NFE [t(σ_max), t(σ_mid), 0] with
σ_mid = 0.821 (the iCT / ECT two-step choice); n > 2: σ geometric from σ_max to σ_mid, then 0.
``prior(noise) = t(σ_max)·noise``: z at t(σ_max) is x_σ = σ_max·e scaled by (1 − t), as the
papers' samplers start (the data part, (1 − t)·x ≈ 0.012·x, is dropped).
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
    expand_time,
    interpolate,
    num_classes_of,
    sum_squares,
)
from onestep.objectives.consistency_math import (
    SIGMA_MID,
    consistency_fn,
    ema_decay_mu,
    euler_step,
    heun_step,
    ict_huber_c,
    karras_sigmas,
    lognormal_grid_weights,
    num_scales,
    pseudo_huber,
    sigma_to_t,
)
from onestep.registry import ConfigError

__all__ = ["ConsistencyTraining", "ConsistencyDistillation"]


# ----------------------------------------------------------------------------------------------
# Shared machinery.


@contextlib.contextmanager
def replayable_rng(device: torch.device):
    """Run a block on a fork of the RNG state; the code after it draws the same random numbers
    (used so the target and the online pass share one dropout mask)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if device.type != "cpu" else "cuda"):
        yield


class Consistency(Objective):
    """Common parts: the consistency function, distance, EMA target, sampler and time grid."""

    uses_jvp = False
    stochastic_sampling = True  # multi-step sampling re-noises between steps

    def __init__(
        self,
        *,
        metric: str,
        huber_c: float | None,
        sigma_min: float,
        sigma_max: float,
        rho: float,
        sigma_mid: float,
        class_dropout: float,
        interval: str,
    ):
        if metric not in ("pseudo_huber", "l2"):
            raise ValueError(f"metric must be one of 'pseudo_huber', 'l2'; got {metric!r}")
        if interval not in ("t", "zero"):
            raise ValueError(f"interval must be one of 't', 'zero'; got {interval!r}")
        if huber_c is not None:
            check_range("huber_c", huber_c, 0.0)
        check_range("sigma_min", sigma_min, 0.0, low_open=True)
        check_range("sigma_max", sigma_max, sigma_min, low_open=True)
        check_range("rho", rho, 0.0, low_open=True)
        check_range("sigma_mid", sigma_mid, 0.0, sigma_max, low_open=True, high_open=True)
        check_range("class_dropout", class_dropout, 0.0, 1.0, high_open=True)
        self.metric, self.huber_c = metric, (None if huber_c is None else float(huber_c))
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.sigma_mid = float(sigma_mid)
        self.class_dropout = float(class_dropout)
        self.interval = interval

    # -- math --------------------------------------------------------------------------------
    def f(self, net: nn.Module, z: Tensor, t: Tensor, y: Tensor | None, features: tuple[int, ...] = ()):
        return consistency_fn(net, z, t, y, interval=self.interval, features=features)

    def distance(self, delta: Tensor) -> Tensor:
        """(B, ...) -> (B,) the configured metric d(Δ)."""
        if self.metric == "l2":
            return sum_squares(delta)
        c = ict_huber_c(delta[0].numel()) if self.huber_c is None else self.huber_c
        return pseudo_huber(delta, c)

    def pair_loss(
        self,
        net: nn.Module,
        target_net: nn.Module,
        x: Tensor,
        y: Tensor | None,
        *,
        z_hi: Tensor,
        t_hi: Tensor,
        z_lo: Tensor | None,
        t_lo: Tensor,
        weight: Tensor,
        feature_blocks: tuple[int, ...],
        logs: dict[str, float],
    ) -> LossOutput:
        """weight · d(f_θ(z_hi, t_hi), sg f_θ⁻(z_lo, t_lo)); where t_lo <= 0 (or z_lo is None) the target is x."""
        # Stop-gradient target first, on a fork of the RNG (same dropout mask as the online pass).
        data_target = t_lo <= 0
        with replayable_rng(x.device), torch.no_grad():
            if z_lo is None or bool(data_target.all()):
                target = x
            else:
                target = self.f(target_net, z_lo, t_lo, y).detach()
                target = torch.where(expand_time(data_target, x).bool(), x, torch.nan_to_num(target))
        # Online consistency function, with the regularizer features from this pass.
        if feature_blocks:
            online, features = self.f(net, z_hi, t_hi, y, tuple(feature_blocks))
        else:
            online, features = self.f(net, z_hi, t_hi, y), []
        # Distance, weighted.
        d = self.distance(online.float() - target.float())
        loss = weight.to(d.dtype) * d
        logs["distance"] = float(d.detach().mean())
        return LossOutput(loss=loss, features=features, logs=logs)

    # -- EMA target ------------------------------------------------------------------------
    def target_decay(self, step: int) -> float | None:
        """μ(step) of the loop's EMA target (None with ``target="sg"``)."""
        return None

    def target_of(self, net: nn.Module, target_net: nn.Module | None) -> nn.Module:
        """θ⁻: the online net itself (stop-gradient) or the loop's EMA copy (θ when none is given)."""
        if getattr(self, "target", "sg") == "sg" or target_net is None:
            return net
        target_net.train(net.training)
        return target_net

    # -- sampling ----------------------------------------------------------------------------
    @property
    def t_max(self) -> float:
        return sigma_to_t(self.sigma_max)

    def prior(self, noise: Tensor) -> Tensor:
        """z at t(σ_max): t_max·e (the papers start from x_σ = σ_max·e)."""
        return self.t_max * noise

    def time_grid(self, nfe: int) -> Tensor:
        """[t(σ_max), t(σ mids)..., 0]: 1 NFE no mid; 2 NFE σ_mid; n NFE σ geometric σ_max -> σ_mid."""
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        if nfe == 1:
            sigmas = [self.sigma_max]
        else:
            ratio = math.log(self.sigma_mid / self.sigma_max)
            sigmas = [self.sigma_max * math.exp(ratio * i / (nfe - 1)) for i in range(nfe)]
        return torch.tensor([sigma_to_t(s) for s in sigmas] + [0.0], dtype=torch.float32)

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
        """x_0 = f_θ(x_t, t); where r > 0 re-noise: x_r = (1 − r)·x_0 + r·e', e' ~ N(0, I) fresh
        (``noise`` if given, else drawn from the global RNG)."""
        t, r = batch_time(t, x), batch_time(r, x)
        x0 = self.f(net, x, t, y)
        if bool((r <= 0).all()):
            return x0
        r_ = expand_time(r.clamp(min=0), x)
        e = torch.randn_like(x0) if noise is None else noise.to(x0)
        return torch.where(r_ > 0, (1 - r_) * x0 + r_ * e, x0)

    # -- pairs on the Karras grid --------------------------------------------------------------
    def grid_pairs(
        self, n: int, num: int, index_dist: str, P_mean: float, P_std: float, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """(σ_lo, σ_hi), each (n,) float64 on device: adjacent points of a ``num``-point Karras grid,
        the index drawn from ``index_dist`` ("lognormal" or "uniform")."""
        sigmas = karras_sigmas(num, self.sigma_min, self.sigma_max, self.rho)
        if index_dist == "lognormal":
            probs = lognormal_grid_weights(sigmas, P_mean, P_std)
            index = torch.multinomial(probs, n, replacement=True)
        else:
            index = torch.randint(0, num - 1, (n,))
        return sigmas[index].to(device), sigmas[index + 1].to(device)


def pair_weights(kind: str, sigma_lo: Tensor, sigma_hi: Tensor) -> Tensor:
    """Per-pair loss weight: 1/(σ_hi − σ_lo) ("inverse_delta", iCT) or 1 ("uniform", CT/CD)."""
    if kind == "inverse_delta":
        return 1.0 / (sigma_hi - sigma_lo)
    return torch.ones_like(sigma_hi)


# ----------------------------------------------------------------------------------------------
# Consistency training.


@register_objective("consistency_training")
class ConsistencyTraining(Consistency):
    """Consistency training (CT / iCT) on adjacent Karras-grid times; equations in the module docstring.

    Args:
        total_steps: K of the curriculum N(k) — required; set it to ``train.steps``.
        schedule: "ict" (default: N(k) = min(s0·2^⌊k/K'⌋, s1) + 1, lognormal index, weight
            1/(σ_{i+1} − σ_i)) or "ct" (N(k) = ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉ + 1, uniform index,
            weight 1).
        s0, s1: curriculum bounds (None: 10, 1280 for "ict"; 2, 150 for "ct").
        target: "sg" (θ⁻ = sg θ, iCT) or "ema" (μ(k) = exp(s0·log μ0 / N(k)), CT).
        mu0: μ0 of the EMA target (CT CIFAR-10: 0.9).
        metric: "pseudo_huber" (√(‖Δ‖² + c²) − c) or "l2" (‖Δ‖², the CT paper's squared ℓ2).
        huber_c: c of the pseudo-Huber metric (None: 0.00054·√dim, iCT).
        index_dist, weighting: override the schedule's index distribution ("lognormal", "uniform")
            and weighting ("inverse_delta", "uniform"); None follows ``schedule``.
        P_mean, P_std: the lognormal index distribution (iCT: −1.1, 2.0).
        sigma_min, sigma_max, rho: the Karras grid (0.002, 80, 7).
        sigma_mid: σ of the intermediate time of 2-NFE sampling (0.821).
        class_dropout: probability of the null label (conditional nets only).
        interval: h given to the net: "t" (MeanFlow's r = 0 map) or "zero" (flow-matching velocity).
    """

    def __init__(
        self,
        total_steps: int,
        schedule: Literal["ict", "ct"] = "ict",
        s0: int | None = None,
        s1: int | None = None,
        target: Literal["sg", "ema"] = "sg",
        mu0: float = 0.9,
        metric: Literal["pseudo_huber", "l2"] = "pseudo_huber",
        huber_c: float | None = None,
        index_dist: Literal["lognormal", "uniform"] | None = None,
        weighting: Literal["inverse_delta", "uniform"] | None = None,
        P_mean: float = -1.1,
        P_std: float = 2.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_mid: float = SIGMA_MID,
        class_dropout: float = 0.1,
        interval: Literal["t", "zero"] = "t",
    ):
        super().__init__(
            metric=metric,
            huber_c=huber_c,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            rho=rho,
            sigma_mid=sigma_mid,
            class_dropout=class_dropout,
            interval=interval,
        )
        check_choice("schedule", schedule, ("ict", "ct"))
        check_choice("target", target, ("sg", "ema"))
        check_choice("index_dist", index_dist, ("lognormal", "uniform", None))
        check_choice("weighting", weighting, ("inverse_delta", "uniform", None))
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"objective.total_steps must be an int >= 1 (set it to train.steps), got {total_steps!r}")
        check_range("mu0", mu0, 0.0, 1.0, low_open=True, high_open=True)
        check_range("P_std", P_std, 0.0, low_open=True)
        ict = schedule == "ict"
        self.total_steps, self.schedule, self.target = int(total_steps), schedule, target
        self.s0 = int(s0 if s0 is not None else (10 if ict else 2))
        self.s1 = int(s1 if s1 is not None else (1280 if ict else 150))
        if not 1 <= self.s0 <= self.s1:
            raise ValueError(f"need 1 <= s0 <= s1, got s0={self.s0}, s1={self.s1}")
        self.mu0 = float(mu0)
        self.index_dist = index_dist or ("lognormal" if ict else "uniform")
        self.weighting = weighting or ("inverse_delta" if ict else "uniform")
        self.P_mean, self.P_std = float(P_mean), float(P_std)

    def num_scales(self, step: int) -> int:
        """N(step) of this objective's curriculum."""
        return num_scales(step, self.total_steps, self.s0, self.s1, self.schedule)

    def ema_decay(self, step: int) -> float:
        """μ(step) = exp(s0·log μ0 / N(step))."""
        return ema_decay_mu(step, self.total_steps, self.s0, self.s1, self.mu0, self.schedule)

    def target_decay(self, step: int) -> float | None:
        """μ(step) with ``target="ema"``; None with ``target="sg"``."""
        return self.ema_decay(step) if self.target == "ema" else None

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
        """Per-sample consistency-training loss (B,)."""
        # Grid size from the curriculum; adjacent pair (σ_i, σ_{i+1}) per sample.
        num = self.num_scales(step)
        sigma_lo, sigma_hi = self.grid_pairs(x.shape[0], num, self.index_dist, self.P_mean, self.P_std, x.device)
        t_lo, t_hi = sigma_to_t(sigma_lo).to(x.dtype), sigma_to_t(sigma_hi).to(x.dtype)
        # Both points share the same noise e.
        e = torch.randn_like(x)
        z_hi, z_lo = interpolate(x, e, t_hi), interpolate(x, e, t_lo)
        # Drop labels to the null class.
        y = drop_labels(y, num_classes_of(net), self.class_dropout)
        # Target network: θ itself (stop-gradient) or the EMA copy.
        target_net = self.target_of(net, target_net)
        logs = {"num_scales": float(num)}
        if self.target == "ema":
            logs["target_decay"] = self.ema_decay(step)
        return self.pair_loss(
            net,
            target_net,
            x,
            y,
            z_hi=z_hi,
            t_hi=t_hi,
            z_lo=z_lo,
            t_lo=t_lo,
            weight=pair_weights(self.weighting, sigma_lo, sigma_hi),
            feature_blocks=feature_blocks,
            logs=logs,
        )


# ----------------------------------------------------------------------------------------------
# Consistency distillation.


@register_objective("consistency_distillation")
class ConsistencyDistillation(Consistency):
    """Consistency distillation (CD) from one ODE step of a frozen teacher; see the module docstring.

    Defaults: the CD paper's grid (N = 18 Karras points, Heun) with iCT's loss choices (lognormal
    index, weight 1/(σ_{i+1} − σ_i), pseudo-Huber, θ⁻ = sg θ). The paper's own choices are
    ``index_dist: uniform``, ``weighting: uniform``, ``target: ema`` (μ = mu0 = 0.95) with LPIPS
    (not available; ``metric: l2`` is the squared ℓ2 variant). On the checkerboard (500 steps from a
    flow-matching teacher) uniform index and weight reached a 1-NFE energy distance of 0.45, the
    iCT choices 0.006 (with either target), the teacher's 50-step Euler samples 0.006.

    Args:
        teacher: frozen net in the backbone contract whose v_φ(z, t) = net(z, t, h=0, y) is the
            probability-flow velocity (a flow_matching run; the recipe gives its run directory).
            Required for training; sampling and evaluation run without it.
        solver: "heun" (default) or "euler" teacher step from t_{n+1} to t_n.
        teacher_guidance: CFG scale of the teacher's velocity (1 = none).
        teacher_guidance_interval: [lo, hi]: guide the teacher only at times lo <= t <= hi (REPA's
            sampler guides t <= 0.7: [0, 0.7]); null (default) guides at every t.
        num_scales: N of the Karras grid (CD CIFAR-10: 18).
        index_dist: "lognormal" (default, iCT) or "uniform" (the CD paper) over the grid's intervals.
        weighting: "inverse_delta" (default, iCT: 1/(σ_{i+1} − σ_i)) or "uniform" (the CD paper).
        target, mu0, metric, huber_c, P_mean, P_std, sigma_*, rho, class_dropout, interval: as in
            ``consistency_training`` (the EMA decay is the constant mu0).
    """

    def __init__(
        self,
        teacher: Callable[..., Tensor] | None = None,
        solver: Literal["heun", "euler"] = "heun",
        teacher_guidance: float = 1.0,
        teacher_guidance_interval: list[float] | None = None,
        num_scales: int = 18,
        target: Literal["sg", "ema"] = "sg",
        mu0: float = 0.95,
        metric: Literal["pseudo_huber", "l2"] = "pseudo_huber",
        huber_c: float | None = None,
        index_dist: Literal["lognormal", "uniform"] = "lognormal",
        weighting: Literal["inverse_delta", "uniform"] = "inverse_delta",
        P_mean: float = -1.1,
        P_std: float = 2.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_mid: float = SIGMA_MID,
        class_dropout: float = 0.1,
        interval: Literal["t", "zero"] = "t",
    ):
        super().__init__(
            metric=metric,
            huber_c=huber_c,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            rho=rho,
            sigma_mid=sigma_mid,
            class_dropout=class_dropout,
            interval=interval,
        )
        if teacher is not None and not callable(teacher):
            raise ValueError(f"teacher must be a callable net(z, t, h, y) or None, got {type(teacher).__name__}")
        check_choice("solver", solver, ("heun", "euler"))
        check_choice("target", target, ("sg", "ema"))
        check_choice("index_dist", index_dist, ("lognormal", "uniform"))
        check_choice("weighting", weighting, ("inverse_delta", "uniform"))
        check_range("teacher_guidance", teacher_guidance, 0.0)
        check_range("mu0", mu0, 0.0, 1.0, low_open=True, high_open=True)
        check_range("P_std", P_std, 0.0, low_open=True)
        if not isinstance(num_scales, int) or num_scales < 2:
            raise ValueError(f"num_scales must be an int >= 2, got {num_scales!r}")
        self.teacher, self.solver, self.teacher_guidance = teacher, solver, float(teacher_guidance)
        self.teacher_guidance_interval = check_guidance_interval("teacher_guidance_interval", teacher_guidance_interval)
        self.num_scales, self.target, self.mu0 = num_scales, target, float(mu0)
        self.index_dist, self.weighting = index_dist, weighting
        self.P_mean, self.P_std = float(P_mean), float(P_std)

    def target_decay(self, step: int) -> float | None:
        """The constant μ0 with ``target="ema"``; None with ``target="sg"``."""
        return self.mu0 if self.target == "ema" else None

    def teacher_step(self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None) -> Tensor:
        """z_r from z_t by one teacher ODE step (no grad)."""
        step_fn = heun_step if self.solver == "heun" else euler_step
        return step_fn(self.teacher, z, t, r, y, self.teacher_guidance, self.teacher_guidance_interval)

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
        """Per-sample consistency-distillation loss (B,)."""
        if self.teacher is None:
            raise ConfigError(
                "consistency_distillation needs a teacher: set objective.teacher to a flow_matching "
                "run directory or checkpoint"
            )
        # Adjacent grid pair per sample; z at the upper time.
        sigma_lo, sigma_hi = self.grid_pairs(
            x.shape[0], self.num_scales, self.index_dist, self.P_mean, self.P_std, x.device
        )
        t_lo, t_hi = sigma_to_t(sigma_lo).to(x.dtype), sigma_to_t(sigma_hi).to(x.dtype)
        e = torch.randn_like(x)
        z_hi = interpolate(x, e, t_hi)
        # Drop labels to the null class (the teacher sees the same labels).
        y = drop_labels(y, num_classes_of(net), self.class_dropout)
        y_teacher = y if num_classes_of(self.teacher) > 0 else None
        # One teacher ODE step down to the lower time.
        z_lo = self.teacher_step(z_hi, t_hi, t_lo, y_teacher)
        target_net = self.target_of(net, target_net)
        return self.pair_loss(
            net,
            target_net,
            x,
            y,
            z_hi=z_hi,
            t_hi=t_hi,
            z_lo=z_lo,
            t_lo=t_lo,
            weight=pair_weights(self.weighting, sigma_lo, sigma_hi),
            feature_blocks=feature_blocks,
            logs={},
        )
