"""Backbones: plain ``nn.Module``s registered in ``onestep.registry.BACKBONES``.

Contract: ``forward(x, t, h=None, y=None, *, cond=None)`` returns a tensor shaped like x;
``forward_features(x, t, h=None, y=None, *, blocks, cond=None)`` returns ``(out, [feature, ...])``;
attributes ``input_shape``, ``num_classes``, ``num_blocks``, ``encoder_blocks``, ``cond_keys``.
Wrap ``torch.func.jvp`` through a backbone in ``jvp_attention()``.

Guidance conditions: ``cond`` is None or a dict of (B,) float tensors (python numbers and 0-d
tensors broadcast) with keys among ``cond_keys``: "omega" (the guidance scale ω ≥ 1), "t_min" and
"t_max" (the guidance interval, 0 ≤ t_min ≤ t_max ≤ 1). ``cond_keys`` is () for a backbone built
without them (then a non-empty ``cond`` is a ValueError) and ("omega", "t_min", "t_max") otherwise
(DiT / MLP / UNet with ``guidance_conditions=True``, and the iMF DiT always); missing keys mean
ω = 1, t_min = 0, t_max = 1 (unguided); unknown keys are a ValueError.
"""

from . import dit, imf_dit, mlp, unet  # noqa: F401  (registers the factories)
from .attention import jvp_attention
from .dit import DiT
from .imf_dit import IMFDiT
from .layers import GUIDANCE_KEYS
from .mlp import MLP
from .unet import UNet

__all__ = ["jvp_attention", "DiT", "IMFDiT", "MLP", "UNet", "GUIDANCE_KEYS"]
