"""Objective base class and the loss container every objective returns.

Notation (shared by all objectives): x data, e ~ N(0, I) noise, t, r times in [0, 1] with r <= t,
h = t - r the interval, z_t = (1 - t) x + t e the noised sample (noise at t = 1), v = e - x the
conditional velocity, u the network's (average) velocity output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class LossOutput:
    """loss: (B,) per-sample, unreduced; features: activations from the gradient-carrying forward
    (one per requested block, in the order requested); logs: scalars for stats.jsonl."""

    loss: Tensor
    features: list[Tensor] = field(default_factory=list)
    logs: dict[str, float] = field(default_factory=dict)


def expand_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a (B,) or scalar time against x of shape (B, ...) -> (B, 1, ..., 1)."""
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), device=x.device, dtype=x.dtype)
    t = t.to(device=x.device, dtype=x.dtype)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(x.shape[0], *([1] * (x.ndim - 1)))


def batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """A (B,) time tensor on x's device/dtype from a scalar or (B,) input."""
    if not torch.is_tensor(t):
        t = torch.tensor(float(t))
    t = t.to(device=x.device, dtype=x.dtype)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def eager_module(net: nn.Module) -> nn.Module:
    """The plain module behind a ``torch.compile`` wrapper (``torch.func`` transforms run on it)."""
    return getattr(net, "_orig_mod", net)


class Objective:
    """The paper's math, otherwise stateless. Subclasses implement ``loss`` and ``sample_step``.

    Curricula are pure functions of ``step``. ``teacher`` (optional) is a frozen backbone used for
    distillation.
    """

    #: True if the objective takes a JVP through the network (fp16 is refused for these).
    uses_jvp: bool = False

    #: Parameters the objective owns; the training loop optimizes them with the network, keeps an
    #: EMA of them, saves them in checkpoints and all-reduces their gradients (None: none).
    trainable: nn.Module | None = None

    def loss(self, net: nn.Module, x: Tensor, y: Tensor | None, *, step: int,
             feature_blocks: tuple[int, ...] = (), target_net: nn.Module | None = None) -> LossOutput:
        """Per-sample loss (B,) for data x and labels y at training step ``step``.

        ``target_net``: an EMA copy of the network owned by the training loop, for objectives that
        want a slow target (sCM uses it in place of the stop-gradient of ``net`` when given);
        objectives without a target ignore it.
        """
        raise NotImplementedError

    @torch.no_grad()
    def sample_step(self, net: nn.Module, x: Tensor, t: Tensor, r: Tensor, y: Tensor | None) -> Tensor:
        """Move samples from time t to time r < t (t, r scalars or (B,))."""
        raise NotImplementedError

    def time_grid(self, nfe: int) -> Tensor:
        """Descending times from 1 (noise) to 0 (data), length nfe + 1 (uniform by default)."""
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        return torch.linspace(1.0, 0.0, nfe + 1)

    def prior(self, noise: Tensor) -> Tensor:
        """Map standard normal noise to the starting point at t = 1."""
        return noise


def register_objective(name: str) -> Callable[[type], type]:
    """Class decorator: register an Objective class in ``OBJECTIVES`` under ``name`` (kwargs are
    validated against ``__init__``)."""
    from onestep.registry import OBJECTIVES

    return OBJECTIVES.register(name)
