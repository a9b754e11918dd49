"""Small teacher helpers: freezing, and SiT's velocity written out (the unfolded form).

SiT's linear interpolant puts data at τ = 1 and noise at τ = 0 and predicts data − noise, so in
onestep's frame (t = 1 noise, v = e − x): τ = 1 − t, z_t is SiT's x_τ unchanged, and
v(z_t, t) = −SiT(z_t, 1 − t)[:C]. ``SiTTeacher`` computes exactly that from the converted
network; the ``sit`` format's default teacher instead folds the flip and the sign into the
weights (``convert.fold_time_flip``, ``convert.negate_output``), giving a plain onestep DiT.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones.layers import batch_times, resolve_blocks

__all__ = ["freeze", "SiTTeacher"]


def freeze(net: nn.Module) -> nn.Module:
    """No trainable parameters, eval mode; returns ``net``."""
    net.requires_grad_(False)
    return net.eval()


class SiTTeacher(nn.Module):
    """v(z_t, t) = −net(z_t, 1 − t, y) for a converted (unfolded) SiT network; h is ignored."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_classes = int(getattr(net, "num_classes", 0) or 0)
        self.input_shape = tuple(getattr(net, "input_shape", ()))
        self.num_blocks = getattr(net, "num_blocks", 0)
        self.encoder_blocks = tuple(getattr(net, "encoder_blocks", ()))
        freeze(self)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        tau = 1 - batch_times(t, x.shape[0], x.device)
        return -self.net(x, tau, None, y)

    def forward_features(self, x, t, h=None, y=None, *, blocks):
        tau = 1 - batch_times(t, x.shape[0], x.device)
        out, features = self.net.forward_features(x, tau, None, y, blocks=resolve_blocks(blocks, self.num_blocks))
        return -out, features
