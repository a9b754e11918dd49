"""Closed forms for data x ~ N(μ, s²I) under z_t = (1 − t)x + t·e (docs/reference.md, "Closed forms for
tests"), shared by the
objective tests: σ(t)² = (1 − t)²s² + t², m(t) = (1 − t)μ, the marginal velocity and the exact flow map."""

import torch
from torch import nn


class GaussianClosedForm(nn.Module):
    """Base for analytic "networks" in the backbone contract; subclasses define ``forward``."""

    num_classes = 0

    def __init__(self, mu: torch.Tensor, s: float):
        super().__init__()
        self.register_buffer("mu", mu)
        self.s = s

    def sigma(self, t):
        return torch.sqrt((1 - t) ** 2 * self.s**2 + t**2)

    def marginal_velocity(self, z, t):
        """v(z, t) = m'(t) + σ'(t)/σ(t)·(z − m(t)) for (B,) times."""
        st = self.sigma(t)
        dsigma = (t - (1 - t) * self.s**2) / st
        return -self.mu + (dsigma / st)[:, None] * (z - (1 - t)[:, None] * self.mu)

    def flow(self, z, t, r):
        """The exact ODE map from time t to time r: m(r) + σ(r)/σ(t)·(z − m(t))."""
        t, r = t[:, None], r[:, None]
        return (1 - r) * self.mu + self.sigma(r) / self.sigma(t) * (z - (1 - t) * self.mu)

    def forward_features(self, z, t, h=None, y=None, *, blocks=()):
        return self.forward(z, t, h, y), []
