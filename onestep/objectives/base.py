"""Objective base class and the loss container every objective returns.

Notation and the shared math (the path z_t = (1 − t)·x + t·e, the adaptive weight, labels and
guidance) are in ``onestep.objectives.common``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class LossOutput:
    """loss: (B,) per-sample, unreduced; features: activations from the gradient-carrying forward
    (one per requested block, in the order requested); logs: the objective's own diagnostics for
    stats.jsonl (e.g. ``mse``, ``distance``). Names starting with ``loss`` belong to the training
    step (``loss`` the total, ``loss_main`` the mean of ``loss``, ``loss_<regularizer>``)."""

    loss: Tensor
    features: list[Tensor] = field(default_factory=list)
    logs: dict[str, float] = field(default_factory=dict)


class Objective:
    """The paper's math, otherwise stateless. Subclasses implement ``loss`` and ``sample_step``.

    Curricula are pure functions of ``step``. ``teacher`` (optional) is a frozen backbone used for
    distillation. Two hooks let an objective use training state that the loop owns:

    - ``trainable``: an ``nn.Module`` of parameters the objective owns (e.g. a learned loss weight);
      the training loop optimizes them with the network, keeps an EMA of them, saves them in
      checkpoints and all-reduces their gradients. None (default) for most objectives.
    - ``target_decay(step)``: the decay μ of an EMA target network θ⁻ ← μ·θ⁻ + (1 − μ)·θ that the
      loop keeps, updates after each optimizer step, saves, and passes to ``loss`` as
      ``target_net``. None (default): no target network.
    """

    #: True if the objective takes a JVP through the network (fp16 is refused for these).
    uses_jvp: bool = False
    #: Parameters owned by the objective (see the class docstring), or None.
    trainable: nn.Module | None = None
    #: True if ``sample_step`` takes ``cond`` (guidance scale and interval as network inputs).
    accepts_cond: bool = False

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
        """The objective's per-sample training loss on one batch.

        Args:
            net: the backbone being trained (called as ``net(x_t, t, r, y, **cond)``).
            x: a data batch (B, *data_shape) in the data's coordinates (pixels in [-1, 1] or latents).
            y: class labels (B,) int64, or None for unconditional data. Objectives that fold
                classifier-free guidance into training drop labels themselves.
            step: the optimizer step about to be taken (curricula are pure functions of it).
            feature_blocks: indices of the blocks whose activations a regularizer (the dispersive
                loss) needs from the gradient-carrying forward.
            target_net: the loop's EMA copy of the network, passed only to objectives that declare
                one through ``target_decay``.

        Returns:
            ``LossOutput``: ``loss`` (B,) unreduced (the loop averages it), ``features`` (one tensor
            per requested block, in that order) and ``logs`` (the objective's diagnostics).
        """
        raise NotImplementedError

    def check_backbone(self, net: nn.Module) -> None:
        """Raise a one-line ValueError if ``net`` cannot be trained by this objective (checked when a
        recipe is validated; ``net`` may live on the meta device). Default: any backbone."""

    def target_decay(self, step: int) -> float | None:
        """μ of the EMA target after optimizer step ``step`` (None: the objective uses no target)."""
        return None

    @torch.no_grad()
    def sample_step(self, net: nn.Module, x: Tensor, t: Tensor, r: Tensor, y: Tensor | None) -> Tensor:
        """One sampler step: move samples from time t to an earlier time r.

        Args:
            net: the trained backbone.
            x: samples at time t, (B, *data_shape); at t = 1 the output of ``prior``.
            t: the current time, a scalar tensor or (B,).
            r: the target time (r < t), a scalar tensor or (B,); r = 0 ends at data.
            y: class labels (B,) or None. Objectives with ``accepts_cond`` also take ``cond``
                ({"omega", "t_min", "t_max"}, passed to the network).

        Returns:
            The samples at time r, same shape as ``x``. ``time_grid(nfe)`` gives the times a
            sampler steps through; one step from 1 to 0 is one-step sampling.
        """
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
