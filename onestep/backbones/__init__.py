"""Backbones: plain ``nn.Module``s registered in ``onestep.registry.BACKBONES``.

Contract: ``forward(x, t, h=None, y=None)`` returns a tensor shaped like x;
``forward_features(x, t, h=None, y=None, *, blocks)`` returns ``(out, [feature, ...])``;
attributes ``input_shape``, ``num_classes``, ``num_blocks``, ``encoder_blocks``.
Wrap ``torch.func.jvp`` through a backbone in ``jvp_attention()``.
"""
from . import dit, mlp, unet  # noqa: F401  (registers the factories)
from .attention import jvp_attention
from .dit import DiT
from .mlp import MLP
from .unet import UNet

__all__ = ["jvp_attention", "DiT", "MLP", "UNet"]
