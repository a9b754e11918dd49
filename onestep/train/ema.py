"""Exponential moving average of parameters (buffers are copied)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """theta_ema <- d * theta_ema + (1 - d) * theta, with d = decay (or min(decay, (1 + k) / (10 + k))
    when ``warmup`` so short runs get a useful average). ``update(..., decay=mu)`` overrides d for one
    update (the consistency target's per-step μ(k))."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, decay: float | None = None) -> None:
        d = self.decay_at(step) if decay is None else decay
        ema_params = list(self.model.parameters())
        params = list(model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state) -> None:
        self.model.load_state_dict(state)
