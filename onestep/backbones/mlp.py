"""Residual MLP backbone for vector data (2-D toy densities and other (D,) samples).

Notation: x (B, D) the network input, t (B,) time in [0, 1], h = t - r (B,) the interval,
y (B,) class ids (``num_classes`` = null class).

Layout: x -> Linear(D, width) + c -> ``depth`` residual blocks -> SiLU -> Linear(width, D), where
c = emb_t(t) + emb_h(h) [+ emb_y(y)] and each block is
a <- a + Linear(SiLU(Linear(SiLU(a)) + Linear_c(c))).
Hidden layer i (a feature for ``forward_features``) is the (B, width) activation after block i.
With ``guidance_conditions=True`` c also gets emb_ω(1 − 1/ω) + emb_tmin(t_min) + emb_tmax(t_max)
from ``cond``; their last Linear starts at zero (a fresh guided net equals the unguided one).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import BACKBONES
from .layers import (
    BlockFeatures,
    TimeConditioned,
    check_input_shape,
)

__all__ = ["MLP", "ResidualBlock"]


class ResidualBlock(nn.Module):
    """a (B, width), c (B, width) -> a + Linear(SiLU(Linear(SiLU(a)) + Linear_c(c)))."""

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.cond = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.fc1(self.act(a)) + self.cond(c))
        return a + self.fc2(self.drop(hidden))


class MLP(TimeConditioned, BlockFeatures, nn.Module):
    """Time-conditioned residual MLP: (B, D), t (B,), h (B,) or None, y (B,) or None -> (B, D).

    ``forward_features(..., blocks=...)`` also returns the (B, width) activations after the
    requested hidden layers. ``encoder_blocks = (depth // 2,)``: the middle hidden layer.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] | list[int] = (2,),
        num_classes: int = 0,
        width: int = 256,
        depth: int = 4,
        time_scale: float = 10.0,
        frequency_size: int = 64,
        dropout: float = 0.0,
        guidance_conditions: bool = False,
    ):
        super().__init__()
        (dim,) = check_input_shape(input_shape, 1, "MLP")
        if depth < 1 or width < 1:
            raise ValueError(f"MLP needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        self.input_shape = (dim,)
        self.num_classes = int(num_classes)
        self.width = width
        self.num_blocks = depth
        self.encoder_blocks = (depth // 2,)

        self.in_proj = nn.Linear(dim, width)
        self.add_time_embedders(width, frequency_size, time_scale, num_classes)
        self.blocks = nn.ModuleList(ResidualBlock(width, dropout) for _ in range(depth))
        self.out_proj = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))
        # Built last so that, with the same seed, every other weight is drawn as without them.
        self.add_guidance_embedders(guidance_conditions, width, frequency_size, time_scale)

    def _run(self, x, t, h, y, blocks: list[int], cond: dict[str, torch.Tensor] | None = None):
        if x.ndim != 2 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"MLP built for per-sample shape {self.input_shape}, got input of shape {tuple(x.shape)}")
        c = self.condition(t, h, y, x.shape[0], x.device, cond)
        a = self.in_proj(x) + c
        wanted = set(blocks)
        captured: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            a = block(a, c)
            if index in wanted:
                captured[index] = a
        return self.out_proj(a), [captured[i] for i in blocks]


@BACKBONES.register("mlp_toy", family="mlp")
def mlp_toy(
    input_shape: tuple[int, ...] | list[int] = (2,),
    num_classes: int = 0,
    width: int = 256,
    depth: int = 4,
    time_scale: float = 10.0,
    frequency_size: int = 64,
    dropout: float = 0.0,
    guidance_conditions: bool = False,
) -> MLP:
    """Residual MLP for 2-D toy densities (checkerboard, eight_gaussians) and other vector data.

    ``time_scale`` multiplies t and h before the sinusoidal features. Default 10: in MeanFlow runs
    on checkerboard (2000 Adam steps, batch 256, lr 1e-3, CPU), 10 put 87-89 % of 1-NFE samples on
    the dark cells vs 76-80 % for 1 and 80-82 % for 100; 1000 was clearly worst (59 % at 1000
    steps). On eight_gaussians 1, 10 and 100 were all close, 10 slightly best by MMD.
    ``guidance_conditions``: also condition on the guidance scale and interval (``cond``).
    """
    return MLP(
        input_shape,
        num_classes,
        width=width,
        depth=depth,
        time_scale=time_scale,
        frequency_size=frequency_size,
        dropout=dropout,
        guidance_conditions=guidance_conditions,
    )


@BACKBONES.register("test_mlp", family="mlp")
def test_mlp(
    input_shape: tuple[int, ...] | list[int] = (2,),
    num_classes: int = 0,
    time_scale: float = 10.0,
    guidance_conditions: bool = False,
) -> MLP:
    """Tiny MLP for tests: width 32, depth 2."""
    return MLP(
        input_shape,
        num_classes,
        width=32,
        depth=2,
        time_scale=time_scale,
        frequency_size=16,
        guidance_conditions=guidance_conditions,
    )
