"""The math of the consistency family as small pure functions (no objective state): the EDM σ ↔ t
map, Karras grids, the CT / iCT curricula and EMA decay, iCT's index distribution and pseudo-Huber
metric, ECT's r(t) mapping, the consistency function and one-step teacher ODE solvers.

Notation: x data, e ~ N(0, I) noise, t in [0, 1] (noise at t = 1), z_t = (1 − t) x + t e; EDM's
σ-parametrization x_σ = x + σ e maps to it by σ = t / (1 − t), z_t = (1 − t)·x_σ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from onestep.objectives.common import batch_time, expand_time, num_classes_of, sum_squares, velocity

__all__ = [
    "karras_sigmas",
    "sigma_to_t",
    "t_to_sigma",
    "ict_num_scales",
    "ct_num_scales",
    "num_scales",
    "ema_decay_mu",
    "lognormal_grid_weights",
    "pseudo_huber",
    "ict_huber_c",
    "ect_r",
    "euler_step",
    "heun_step",
    "consistency_fn",
    "ICT_HUBER_SCALE",
    "SIGMA_MID",
]

ICT_HUBER_SCALE = 0.00054
SIGMA_MID = 0.821


def sigma_to_t(sigma: Tensor | float) -> Tensor | float:
    """t = σ / (1 + σ) (σ = ∞ -> 1). Works on floats and tensors."""
    if torch.is_tensor(sigma):
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))
    return 1.0 if math.isinf(sigma) else sigma / (1.0 + sigma)


def t_to_sigma(t: Tensor | float) -> Tensor | float:
    """σ = t / (1 − t) (t = 1 -> ∞). Works on floats and tensors."""
    if torch.is_tensor(t):
        return t / (1 - t)
    return math.inf if t >= 1.0 else t / (1.0 - t)


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """(n,) float64 ascending Karras grid σ_i = (σ_min^{1/ρ} + (i−1)/(n−1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ."""
    if n < 2:
        raise ValueError(f"a Karras grid needs n >= 2 points, got {n}")
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def ict_num_scales(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's exponential curriculum N(k) = min(s0·2^⌊k/K'⌋, s1) + 1, K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋."""
    k_prime = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
    return int(min(s0 * 2 ** (k // k_prime), s1)) + 1


def ct_num_scales(k: int, K: int, s0: int = 2, s1: int = 150) -> int:
    """The original CT curriculum N(k) = ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉ + 1 (k clipped to K)."""
    frac = min(max(k, 0), K) / K
    return int(math.ceil(math.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)) + 1


def num_scales(k: int, K: int, s0: int, s1: int, schedule: str) -> int:
    """N(k) for ``schedule`` "ict" or "ct"."""
    return ict_num_scales(k, K, s0, s1) if schedule == "ict" else ct_num_scales(k, K, s0, s1)


def ema_decay_mu(k: int, K: int, s0: int = 2, s1: int = 150, mu0: float = 0.9, schedule: str = "ct") -> float:
    """CT's EMA-target decay μ(k) = exp(s0·log μ0 / N(k)), N(k) from ``schedule``."""
    return math.exp(s0 * math.log(mu0) / num_scales(k, K, s0, s1, schedule))


def lognormal_grid_weights(sigmas: Tensor, P_mean: float = -1.1, P_std: float = 2.0) -> Tensor:
    """iCT's discretized lognormal: p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std)).

    sigmas: (N,) ascending -> (N − 1,) float64 probabilities of the pairs (σ_i, σ_{i+1}), summing to 1.
    """
    cdf = torch.erf((torch.log(sigmas.double()) - P_mean) / (math.sqrt(2.0) * P_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def ict_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054·√dim (dim = elements per sample; CIFAR-10: 0.03)."""
    return ICT_HUBER_SCALE * math.sqrt(dim)


def pseudo_huber(delta: Tensor, c: float) -> Tensor:
    """(B, ...) -> (B,) d = √(‖Δ‖² + c²) − c on the whole-sample norm (c = 0: ‖Δ‖).

    ≈ ‖Δ‖²/(2c) for ‖Δ‖ ≪ c, ≈ ‖Δ‖ − c for ‖Δ‖ ≫ c. Float32 or wider. The radicand is clamped at
    1e-30 so c = 0 has a zero (not NaN) gradient at Δ = 0.
    """
    sq = sum_squares(delta)
    return torch.sqrt((sq + c * c).clamp_min(1e-30)) - c


def ect_r(sigma_t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's mapping in the EDM σ convention (the paper's "t" is σ):
    σ_r = max(0, σ_t·(1 − q^{−(stage+1)}·n(σ_t))), n(σ) = 1 + k·sigmoid(−b·σ). Shape like sigma_t."""
    n = 1 + k * torch.sigmoid(-b * sigma_t)
    return (sigma_t * (1 - q ** (-(stage + 1)) * n)).clamp(min=0)


def consistency_fn(
    net: nn.Module,
    z: Tensor,
    t: Tensor | float,
    y: Tensor | None = None,
    *,
    interval: str = "t",
    features: tuple[int, ...] = (),
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """f_θ(z, t) = z − t·F_θ(z, t, h, y), h = t (interval "t") or 0 ("zero"); f(z, 0) = z.

    z (B, ...), t scalar or (B,). With ``features`` returns (f, [activations of those blocks]).
    """
    t = batch_time(t, z)
    h = t if interval == "t" else torch.zeros_like(t)
    if num_classes_of(net) == 0:
        y = None
    if features:
        out, feats = net.forward_features(z, t, h, y, blocks=tuple(features))
        return z - expand_time(t, z) * out.to(z.dtype), list(feats)
    return z - expand_time(t, z) * net(z, t, h, y).to(z.dtype)


def euler_step(
    teacher: nn.Module,
    z: Tensor,
    t: Tensor | float,
    r: Tensor | float,
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    interval: tuple[float, float] | None = None,
) -> Tensor:
    """One Euler step of dz/dt = v_φ(z, t) from t to r: z_r = z − (t − r)·v_φ(z, t). No grad.
    ``interval``: guidance only where the evaluated time lies in it (``common.guided_output``)."""
    t, r = batch_time(t, z), batch_time(r, z)
    return z - expand_time(t - r, z) * velocity(teacher, z, t, y, guidance_scale, interval).to(z.dtype)


def heun_step(
    teacher: nn.Module,
    z: Tensor,
    t: Tensor | float,
    r: Tensor | float,
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    interval: tuple[float, float] | None = None,
) -> Tensor:
    """One Heun step from t to r: z̃ = z − (t − r)·v(z, t), z_r = z − (t − r)·(v(z, t) + v(z̃, r))/2. No grad."""
    t, r = batch_time(t, z), batch_time(r, z)
    dt = expand_time(t - r, z)
    v_t = velocity(teacher, z, t, y, guidance_scale, interval).to(z.dtype)
    z_euler = z - dt * v_t
    v_r = velocity(teacher, z_euler, r, y, guidance_scale, interval).to(z.dtype)
    return z - dt * 0.5 * (v_t + v_r)
