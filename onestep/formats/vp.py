"""An ε-prediction network on DiT's discrete DDPM schedule, as onestep's velocity v(z_t, t).

DiT was trained on x_k = sqrt(ᾱ_k)·x + sqrt(1 − ᾱ_k)·ε, k = 0..999, β linear from 1e-4 to 0.02,
ᾱ_k = Π_{i≤k}(1 − β_i), with the integer k as its time input. onestep's z_t = (1 − t)·x + t·e is
the same point after scaling: with S(t) = sqrt((1 − t)² + t²),

    x_in = z_t / S(t),   sqrt(ᾱ) = (1 − t)/S,   sqrt(1 − ᾱ) = t/S,   log-SNR λ(t) = 2·ln((1 − t)/t),

and the VP noise ε is onestep's e. The index k(t) inverts the table's log-SNR
λ_k = ln(ᾱ_k / (1 − ᾱ_k)) (exact cumulative product, strictly decreasing) by linear interpolation
of k in λ; the fractional k goes to the network's time embedding. Then ε̂ = net(x_in, k(t))[:C]
and, since v = e − x and x̂ = (z − t·ε̂)/(1 − t),

    v = (ε̂ − z)/(1 − t) = (z − x̂)/t.

Range: the table covers λ ∈ [λ_999, λ_0], i.e. t ∈ [T_MIN, T_MAX] ≈ [0.0099015, 0.9936872]
(k(0.5) ≈ 258.09, k(0.255) ≈ 100.0). Inside it the map is exact. Outside it (samplers start at
t = 1) the log-SNR is clamped to the table's end, so k = 0 below T_MIN and k = 999 above T_MAX,
and the network is read at the clamped VP point (a = sqrt(ᾱ_k), b = sqrt(1 − ᾱ_k)):

* t ≤ 1/2: v = (ε̂ − z)/(1 − t). At t < T_MIN the noise prediction is that of the k = 0 network
  at x_in; the denominator stays ≥ 1/2. At t = 0: v = ε̂ − z.
* t > 1/2: x̂ = (x_in − b·ε̂)/a, v = (z − x̂)/t. At t > T_MAX x̂ is the k = 999 network's denoised
  estimate; the denominator stays > 1/2. At t = 1: v = z − x̂ (x_in = z there).

Inside the table both forms are the same number (a = (1 − t)/S, b = t/S), so v is continuous in t
on all of [0, 1], including at T_MIN, T_MAX and the switch at 1/2, and finite at t = 0 and t = 1.
Outside the range v is an extrapolation: for data N(μ, s²I) and an exact ε-network its error is
≈ sqrt(1 − ᾱ_0)·|z − μ|/s² = 0.01·|z − μ|/s² at t = 0 and ≈ sqrt(ᾱ_999)·s²·|z| ≈ 0.0064·s²·|z|
at t = 1 (tested).

Guidance: v is affine in ε̂ at fixed (z, t), so onestep's ``velocity(teacher, z, t, y, w)`` (one
batched call, null class = num_classes) equals v computed from ε̂ guided on all C channels.
DiT's released sampler guides only channels 0–2 ("for exact reproducibility") and leaves
channel 3 unguided; this teacher follows the standard formula on all four.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..backbones.layers import batch_times, resolve_blocks

__all__ = ["ddpm_log_snr", "log_snr", "ddpm_index", "VPEpsilonTeacher", "T_MIN", "T_MAX"]


def ddpm_log_snr(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """λ_k = ln(ᾱ_k / (1 − ᾱ_k)), k = 0..num_steps-1, float64, from the exact cumulative product."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def log_snr(t: torch.Tensor) -> torch.Tensor:
    """λ(t) = 2·ln((1 − t)/t) of z_t / S(t): +inf at t = 0, −inf at t = 1."""
    return 2.0 * (torch.log1p(-t) - torch.log(t))


def ddpm_index(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Fractional DDPM index k(t) in [0, len(table) − 1]: linear in λ between table entries, clamped."""
    lam = log_snr(t.to(table.dtype)).clamp(table[-1], table[0])
    rising = -table  # increasing
    upper = torch.searchsorted(rising, -lam).clamp(1, len(table) - 1)
    lower = upper - 1
    frac = (-lam - rising[lower]) / (rising[upper] - rising[lower])
    return lower.to(table.dtype) + frac


_LAMBDA = ddpm_log_snr()
T_MIN = 1.0 / (1.0 + math.exp(_LAMBDA[0].item() / 2))  # λ(t) = λ_0
T_MAX = 1.0 / (1.0 + math.exp(_LAMBDA[-1].item() / 2))  # λ(t) = λ_999


class VPEpsilonTeacher(nn.Module):
    """v(z_t, t) from an ε-network fed (z_t / S(t), k(t), y) (module docstring); h is ignored.

    ``eps_net(x, k, h, y)`` returns ε̂ like x (an onestep DiT converted from DiT's weights, time
    scale 1). Backbone contract: ``num_classes``, ``input_shape``, ``num_blocks``, ``encoder_blocks``
    and ``forward_features`` come from eps_net. No trainable parameters.
    """

    def __init__(self, eps_net: nn.Module):
        super().__init__()
        self.net = eps_net
        self.num_classes = int(getattr(eps_net, "num_classes", 0) or 0)
        self.input_shape = tuple(getattr(eps_net, "input_shape", ()))
        self.num_blocks = getattr(eps_net, "num_blocks", 0)
        self.encoder_blocks = tuple(getattr(eps_net, "encoder_blocks", ()))
        self.register_buffer("log_snr_table", ddpm_log_snr(), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _apply(self, fn, recurse=True):
        # Keep the λ table in float64 when the module is cast (.half(), .double(), .to(dtype)).
        table = self.log_snr_table
        out = super()._apply(fn, recurse)
        self.log_snr_table = table.to(device=self.log_snr_table.device, dtype=torch.float64)
        return out

    def index(self, t: torch.Tensor) -> torch.Tensor:
        """k(t) (float64)."""
        return ddpm_index(t.double(), self.log_snr_table)

    def _run(self, x, t, y, blocks):
        t = batch_times(t, x.shape[0], x.device).double()
        table = self.log_snr_table
        lam = log_snr(t).clamp(table[-1], table[0])
        k = ddpm_index(t, table)
        work = torch.promote_types(x.dtype, torch.float32)
        scale = torch.sqrt((1 - t) ** 2 + t**2)
        a, b = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        shape = (-1,) + (1,) * (x.ndim - 1)
        col = lambda c: c.to(work).reshape(shape)  # noqa: E731
        z = x.to(work)
        x_in = z / col(scale)
        if blocks:
            eps, features = self.net.forward_features(x_in.to(x.dtype), k.to(work), None, y, blocks=blocks)
        else:
            eps, features = self.net(x_in.to(x.dtype), k.to(work), None, y), []
        eps = eps.to(work)
        v_low = (eps - z) / col((1 - t).clamp_min(0.5))
        x_hat = (x_in - col(b) * eps) / col(a)
        v_high = (z - x_hat) / col(t.clamp_min(0.5))
        v = torch.where(col(t) <= 0.5, v_low, v_high)
        return v.to(x.dtype), features

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z_t (B, C, H, W), t (B,) -> v (B, C, H, W). ``h`` is ignored."""
        return self._run(x, t, y, [])[0]

    def forward_features(self, x, t, h=None, y=None, *, blocks):
        """v and the ε-network's tokens after the requested blocks."""
        return self._run(x, t, y, resolve_blocks(blocks, self.num_blocks))
