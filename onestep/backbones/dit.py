"""DiT backbone as used by MeanFlow: patchify, fixed 2-D sin-cos positions, adaLN-Zero blocks.

Notation: x (B, C, H, W) the network input (z_t in the objectives), t (B,) time in [0, 1],
h = t - r (B,) the interval, y (B,) class ids (``num_classes`` = null class).

The condition c = emb_t(t) + emb_h(h) + emb_y(y) drives every block's adaLN-Zero modulation.

Decoupled conditioning (``decoupled_depth=K``; Decoupled MeanFlow, Lee et al. 2025): blocks [0, K)
get c_t = emb_t(t) + emb_h(0) + emb_y(y), blocks [K, depth) and the final layer get
c_r = emb_t(r) + emb_h(0) + emb_y(y) with r = t − h, through the same embedders: no new parameters,
the interval reaches the net only through the decoder's time. At h = 0 (r = t) the network computes
exactly what the plain one computes with h = 0, so a flow-matching DiT (or a converted SiT / REPA
checkpoint) is a flow map as loaded. emb_h sees 0 in this mode (a learned constant; zero for the
converted public checkpoints), so every DiT state dict loads into either mode.
With ``guidance_conditions=True`` c also gets emb_ω(1 − 1/ω) + emb_tmin(t_min) + emb_tmax(t_max)
from ``cond`` (three more embedders whose last Linear starts at zero, so a fresh guided net computes
the same function as the unguided one with the same other weights).
Tokens are patches of p×p pixels, row-major; N = (H/p)·(W/p).
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn

from ..registry import BACKBONES
from .attention import Attention
from .layers import (
    BlockFeatures,
    TimeConditioned,
    batch_times,
    check_input_shape,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
)

__all__ = ["DiT", "DiTBlock", "DIT_SIZES"]


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: (B, N, D), c (B, D) -> (B, N, D).

    Six modulation vectors (shift, scale, gate for attention and for the MLP) come from SiLU(c)
    through a zero-initialised linear layer, so the block starts as the identity.
    ``dropout`` applies after the attention output projection and inside the MLP.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=_gelu_tanh, drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_attn.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_attn, scale_attn))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN + linear to patch pixels: (B, N, D), c (B, D) -> (B, N, p·p·C). Zero-initialised."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(TimeConditioned, BlockFeatures, nn.Module):
    """Diffusion transformer with two time embedders (t and h = t - r) and an optional class embedder.

    ``forward(x, t, h=None, y=None, *, cond=None)``: (B, C, H, W) -> (B, C, H, W). ``h=None`` means
    h = 0; ``y=None`` means the null class (ignored when ``num_classes == 0``); ``cond`` (guidance
    scale and interval) only with ``guidance_conditions=True``.
    ``forward_features(..., blocks=...)`` also returns the tokens (B, N, hidden_size) after the
    requested blocks. ``encoder_blocks = (depth // 4,)``: the 0-based block index used by the
    dispersive loss (block 3 of 12 for B/2, block 7 of 28 for XL/2).
    ``decoupled_depth``: None (MeanFlow's (t, h) conditioning), K in [0, depth] or "auto"
    (round(2·depth / 3), the DMF paper's "2/3 of the depth"; it used 20 of 28 for XL/2): the
    decoupled (t, r) conditioning of the module docstring.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] | list[int] = (4, 32, 32),
        num_classes: int = 0,
        patch_size: int = 2,
        depth: int = 12,
        hidden_size: int = 768,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        time_scale: float = 1.0,
        dropout: float = 0.0,
        frequency_size: int = 256,
        guidance_conditions: bool = False,
        decoupled_depth: int | str | None = None,
    ):
        super().__init__()
        channels, height, width = check_input_shape(input_shape, 3, "DiT")
        if patch_size < 1 or height % patch_size or width % patch_size:
            raise ValueError(
                f"DiT input_shape {tuple(input_shape)}: height and width must be divisible by patch_size {patch_size}"
            )
        if hidden_size % num_heads:
            raise ValueError(f"DiT hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"DiT hidden_size {hidden_size} must be divisible by 4 (2-D sin-cos positions)")
        if depth < 1:
            raise ValueError(f"DiT depth must be >= 1, got {depth}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        self.input_shape = (channels, height, width)
        self.num_classes = int(num_classes)
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.grid_size = (height // patch_size, width // patch_size)
        self.num_blocks = depth
        self.encoder_blocks = (depth // 4,)
        self.decoupled_depth = resolve_decoupled_depth(decoupled_depth, depth)

        self.x_embedder = nn.Conv2d(channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(hidden_size, *self.grid_size).unsqueeze(0), persistent=False
        )
        self.add_time_embedders(hidden_size, frequency_size, time_scale, num_classes)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, channels)
        self.guidance_embedders = None
        self.reset_parameters()
        # Built after the other weights are drawn, so with the same seed they are the unguided net's.
        self.add_guidance_embedders(guidance_conditions, hidden_size, frequency_size, time_scale, normal_init=True)

    def reset_parameters(self) -> None:
        """DiT initialisation: xavier linears, zero adaLN modulations and zero output layer.

        Guidance embedders (if any) are initialised last, like the t/h embedders but with their last
        Linear at zero.
        """
        guidance = set() if self.guidance_embedders is None else set(self.guidance_embedders.modules())
        for module in self.modules():
            if isinstance(module, nn.Linear) and module not in guidance:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = self.x_embedder.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        self.t_embedder.reset_parameters()
        self.h_embedder.reset_parameters()
        if self.y_embedder is not None:
            self.y_embedder.reset_parameters()
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.reset_guidance_embedders(normal_init=True)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, p·p·C) -> (B, C, H, W)."""
        return unpatchify(tokens, self.input_shape[0], self.patch_size, self.grid_size)

    def _run(self, x, t, h, y, blocks: list[int], cond: dict[str, torch.Tensor] | None = None):
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"DiT built for per-sample shape {self.input_shape}, got input of shape {tuple(x.shape)}")
        c, c_r, first_r = self.conditions(t, h, y, x.shape[0], x.device, cond)
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        wanted = set(blocks)
        captured: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            tokens = block(tokens, c if index < first_r else c_r)
            if index in wanted:
                captured[index] = tokens
        out = self.unpatchify(self.final_layer(tokens, c_r))
        return out, [captured[i] for i in blocks]

    def conditions(self, t, h, y, batch_size: int, device, cond=None):
        """(c of the first blocks, c of the later blocks and the final layer, index of the first later
        block): one c for all (MeanFlow's (t, h)), or c_t and c_r = c(t − h) when decoupled."""
        if self.decoupled_depth is None:
            c = self.condition(t, h, y, batch_size, device, cond)
            return c, c, self.num_blocks
        t = batch_times(t, batch_size, device)
        r = t if h is None else t - batch_times(h, batch_size, device)
        c_t = self.condition(t, None, y, batch_size, device, cond)
        c_r = self.condition(r, None, y, batch_size, device, cond)
        return c_t, c_r, self.decoupled_depth


def resolve_decoupled_depth(value: int | str | None, depth: int) -> int | None:
    """None, or the number K of blocks that see the current time t (the rest see r): an int in
    [0, depth], or "auto" = round(2·depth / 3)."""
    if value is None:
        return None
    if value == "auto":
        return round(2 * depth / 3)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= depth:
        raise ValueError(
            f"DiT decoupled_depth must be null, 'auto' or a whole number in 0..{depth} (the depth), got {value!r}"
        )
    return value


# Literal sizes from the MeanFlow / DiT papers: depth, width, heads, patch.
DIT_SIZES: dict[str, dict[str, int]] = {
    "dit_s_2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "dit_s_4": dict(depth=12, hidden_size=384, num_heads=6, patch_size=4),
    "dit_b_2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "dit_b_4": dict(depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "dit_m_2": dict(depth=16, hidden_size=1024, num_heads=16, patch_size=2),
    "dit_l_2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "dit_xl_2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "test_dit": dict(depth=2, hidden_size=32, num_heads=2, patch_size=2),
}


# The generic factory is the class itself (every architecture knob; defaults: B/2).
BACKBONES.register("dit", family="dit")(DiT)


def _register_size(name: str, doc: str, default_shape: tuple[int, ...] = (4, 32, 32)) -> None:
    """Register ``name`` as a factory of the literal size DIT_SIZES[name]."""

    def factory(
        input_shape: tuple[int, ...] | list[int] = default_shape,
        num_classes: int = 0,
        time_scale: float = 1.0,
        dropout: float = 0.0,
        guidance_conditions: bool = False,
        decoupled_depth: int | str | None = None,
    ) -> DiT:
        return DiT(
            input_shape,
            num_classes,
            time_scale=time_scale,
            dropout=dropout,
            guidance_conditions=guidance_conditions,
            decoupled_depth=decoupled_depth,
            **DIT_SIZES[name],
        )

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    BACKBONES.register(name, family="dit")(factory)


_SIZE_DOCS = {
    "dit_s_2": "DiT-S/2: depth 12, width 384, 6 heads, patch 2.",
    "dit_s_4": "DiT-S/4: depth 12, width 384, 6 heads, patch 4.",
    "dit_b_2": "DiT-B/2: depth 12, width 768, 12 heads, patch 2 (MeanFlow B/2: ~131M params with 1000 classes).",
    "dit_b_4": "DiT-B/4: depth 12, width 768, 12 heads, patch 4 (MeanFlow ablation model).",
    "dit_m_2": "DiT-M/2: depth 16, width 1024, 16 heads, patch 2 (MeanFlow M/2).",
    "dit_l_2": "DiT-L/2: depth 24, width 1024, 16 heads, patch 2 (MeanFlow L/2).",
    "dit_xl_2": "DiT-XL/2: depth 28, width 1152, 16 heads, patch 2 (MeanFlow XL/2).",
    "test_dit": "Tiny DiT for tests: depth 2, width 32, 2 heads, patch 2.",
}
for _name, _doc in _SIZE_DOCS.items():
    _register_size(_name, _doc, (4, 8, 8) if _name == "test_dit" else (4, 32, 32))
