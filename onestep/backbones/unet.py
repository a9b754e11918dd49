"""DDPM++-style U-Net (the EDM "SongUNet" configuration for CIFAR-10), written for the backbone contract.

Notation: x (B, C, H, W) the network input (z_t in the objectives), t (B,) time in [0, 1],
h = t − r (B,) the interval, y (B,) class ids (``num_classes`` = the null class).

Condition: emb = SiLU(map_t(PE(s·t)) + map_h(PE(s·h)) [+ E_y(y)]), PE the positional (sinusoidal)
embedding with ``max_positions`` 10000 and frequencies 1/10000^{k/(n/2 − 1)} (EDM's "endpoint"
form), s = ``time_scale`` (default 1000 so t in [0, 1] spans the frequencies as DDPM's integer
steps do), map = Linear-SiLU-Linear to ``model_channels × channel_mult_emb``. E_y has one extra row
for the null class. With ``guidance_conditions=True`` the sum inside the SiLU also gets
map_ω(PE(s·(1 − 1/ω))) + map_tmin(PE(s·t_min)) + map_tmax(PE(s·t_max)) from ``cond``, each map's last
Linear starting at zero (a fresh guided net computes the same function as the unguided one).

Layout (EDM DDPM++: ``channel_mult=[2, 2, 2]``, 4 res blocks per level, attention at 16×16,
dropout, skip scale √½, GroupNorm(min(32, C/4)), box-filter resampling inside the blocks):

    encoder: conv3x3 -> per level: [down block (levels > 0)] + num_res_blocks blocks
    decoder: per level (coarsest first): [2 middle blocks (first with attention) | up block]
             + (num_res_blocks + 1) blocks that each concatenate one encoder skip
    output:  GroupNorm -> SiLU -> conv3x3 (zero-initialised)

Each residual block: a = conv(SiLU(GN(x))) (resampled first for up/down), a += affine(emb),
a = conv_zero(dropout(SiLU(GN(a)))), x' = (a + skip(x))·√½; with attention
x'' = (x' + proj_zero(attn(GN(x'))))·√½ (single head by default, ``attention.attention`` so
``jvp_attention()`` makes it forward-differentiable).

Blocks (for ``forward_features``) are the residual blocks in execution order: the encoder blocks
(``num_res_blocks`` per level plus the down blocks), then the decoder blocks (middle, up and
skip-consuming blocks). A block's feature is its (B, C, H', W') output. ``encoder_blocks`` is the
last block of the down path (before the middle blocks).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import BACKBONES
from .attention import attention
from .layers import GUIDANCE_KEYS, BlockFeatures, batch_times, check_input_shape

__all__ = ["UNet", "UNetBlock", "positional_embedding"]


def positional_embedding(t: torch.Tensor, num_channels: int, max_positions: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, num_channels) = [cos(t·f_k), sin(t·f_k)], f_k = (1/max_positions)^{k/(n/2 − 1)}."""
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    half = num_channels // 2
    freqs = torch.arange(half, device=t.device, dtype=t.dtype) / max(half - 1, 1)
    freqs = (1.0 / max_positions) ** freqs
    args = t[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, max(channels // 4, 1)), num_channels=channels, eps=eps)


def _xavier(module: nn.Module, gain: float = 1.0) -> nn.Module:
    nn.init.xavier_uniform_(module.weight, gain=gain)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def _zero(module: nn.Module) -> nn.Module:
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def _resample(x: torch.Tensor, up: bool, down: bool) -> torch.Tensor:
    """Box-filter resampling ([1, 1] filter): nearest ×2 up, 2×2 average down."""
    if up:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if down:
        return F.avg_pool2d(x, 2)
    return x


class UNetBlock(nn.Module):
    """Residual block with the embedding added after the first conv, optional up/down resampling and
    optional self-attention: x (B, C_in, H, W), emb (B, E) -> (B, C_out, H', W')."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        skip_scale: float = math.sqrt(0.5),
        eps: float = 1e-6,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down = up, down
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.num_heads = num_heads if attention else 0
        self.norm0 = _group_norm(in_channels, eps)
        self.conv0 = _xavier(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.affine = _xavier(nn.Linear(emb_channels, out_channels))
        self.norm1 = _group_norm(out_channels, eps)
        self.conv1 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = None
        if in_channels != out_channels or up or down:
            self.skip = _xavier(nn.Conv2d(in_channels, out_channels, 1))
        if self.num_heads:
            if out_channels % self.num_heads:
                raise ValueError(f"attention width {out_channels} must be divisible by num_heads {self.num_heads}")
            self.norm2 = _group_norm(out_channels, eps)
            self.qkv = _xavier(nn.Conv2d(out_channels, out_channels * 3, 1), gain=math.sqrt(0.2))
            self.proj = _zero(nn.Conv2d(out_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(_resample(F.silu(self.norm0(x)), self.up, self.down))
        x = x + self.affine(emb)[:, :, None, None].to(x.dtype)
        x = F.silu(self.norm1(x))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        skip = orig if self.skip is None else self.skip(_resample(orig, self.up, self.down))
        x = (x + skip) * self.skip_scale
        if self.num_heads:
            batch, channels, height, width = x.shape
            head_dim = channels // self.num_heads
            qkv = self.qkv(self.norm2(x)).reshape(batch, 3, self.num_heads, head_dim, height * width)
            q, k, v = (part.transpose(-1, -2) for part in qkv.unbind(1))  # (B, heads, N, head_dim)
            a = attention(q, k, v).transpose(-1, -2).reshape(batch, channels, height, width)
            x = (x + self.proj(a)) * self.skip_scale
        return x


class UNet(BlockFeatures, nn.Module):
    """DDPM++ U-Net with two time embeddings (t and h = t − r) and an optional class embedding.

    ``forward(x, t, h=None, y=None, *, cond=None)``: (B, C, H, W) -> (B, C, H, W); ``h=None`` means
    h = 0, ``y=None`` the null class (ignored when ``num_classes == 0``); ``cond`` (guidance scale and
    interval) only with ``guidance_conditions=True``.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        channel_mult_emb: int = 4,
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.13,
        num_heads: int = 1,
        time_scale: float = 1000.0,
        guidance_conditions: bool = False,
    ):
        super().__init__()
        channels, height, width = check_input_shape(input_shape, 3, "UNet")
        levels = len(channel_mult)
        if levels < 1 or num_res_blocks < 1 or model_channels < 1:
            raise ValueError("UNet needs at least one level, one res block per level and model_channels >= 1")
        if height != width or height % (2 ** (levels - 1)):
            raise ValueError(
                f"UNet with {levels} levels needs square inputs divisible by {2 ** (levels - 1)}, got {height}x{width}"
            )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        self.input_shape = (channels, height, width)
        self.num_classes = int(num_classes)
        self.time_scale = float(time_scale)
        self.noise_channels = model_channels
        emb_channels = model_channels * channel_mult_emb

        def mapping() -> nn.Sequential:
            return nn.Sequential(
                _xavier(nn.Linear(model_channels, emb_channels)),
                nn.SiLU(),
                _xavier(nn.Linear(emb_channels, emb_channels)),
            )

        self.map_t = mapping()
        self.map_h = mapping()
        self.map_y = nn.Embedding(num_classes + 1, emb_channels) if num_classes > 0 else None
        if self.map_y is not None:
            nn.init.normal_(self.map_y.weight, std=1.0)

        block = dict(emb_channels=emb_channels, num_heads=num_heads, dropout=dropout)
        # Encoder.
        self.conv_in = _xavier(nn.Conv2d(channels, model_channels, 3, padding=1))
        self.enc = nn.ModuleList()
        skips = [model_channels]
        cout = model_channels
        for level, mult in enumerate(channel_mult):
            res = height >> level
            if level > 0:
                self.enc.append(UNetBlock(cout, cout, down=True, **block))
                skips.append(cout)
            for _ in range(num_res_blocks):
                cin, cout = cout, model_channels * mult
                self.enc.append(UNetBlock(cin, cout, attention=res in attn_resolutions, **block))
                skips.append(cout)
        # Decoder: (block, takes_skip) in execution order.
        self.dec = nn.ModuleList()
        self._dec_takes_skip: list[bool] = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = height >> level
            if level == levels - 1:
                self._add_dec(UNetBlock(cout, cout, attention=True, **block), False)
                self._add_dec(UNetBlock(cout, cout, **block), False)
            else:
                self._add_dec(UNetBlock(cout, cout, up=True, **block), False)
            for index in range(num_res_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = index == num_res_blocks and res in attn_resolutions
                self._add_dec(UNetBlock(cin, cout, attention=attn, **block), True)
        self.norm_out = _group_norm(cout)
        self.conv_out = _zero(nn.Conv2d(cout, channels, 3, padding=1))

        self.num_blocks = len(self.enc) + len(self.dec)
        self.encoder_blocks = (len(self.enc) - 1,)
        # Built last so that, with the same seed, every other weight is drawn as without them.
        self.cond_keys = GUIDANCE_KEYS if guidance_conditions else ()
        self.map_guidance = None
        if guidance_conditions:
            self.map_guidance = nn.ModuleDict({key: mapping() for key in GUIDANCE_KEYS})
            for m in self.map_guidance.values():
                _zero(m[-1])

    def _add_dec(self, block: UNetBlock, takes_skip: bool) -> None:
        self.dec.append(block)
        self._dec_takes_skip.append(takes_skip)

    def embedding(
        self, t, h, y, batch_size: int, device: torch.device, cond: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """emb = SiLU(map_t(PE(s·t)) + map_h(PE(s·h)) [+ E_y(y)] [+ guidance maps]): (B, emb_channels).

        ``cond`` is the resolved dict of (B,) tensors (guided nets only)."""
        t = batch_times(t, batch_size, device)
        h = torch.zeros_like(t) if h is None else batch_times(h, batch_size, device)
        weight_dtype = self.map_t[0].weight.dtype
        emb = self.map_t(positional_embedding(t * self.time_scale, self.noise_channels).to(weight_dtype))
        emb = emb + self.map_h(positional_embedding(h * self.time_scale, self.noise_channels).to(weight_dtype))
        if self.map_y is not None:
            if y is None:
                y = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
            emb = emb + self.map_y(y.to(device=device, dtype=torch.long))
        if self.map_guidance is not None and cond is not None:
            values = {"omega": 1 - 1 / cond["omega"], "t_min": cond["t_min"], "t_max": cond["t_max"]}
            for key, value in values.items():
                features = positional_embedding(value * self.time_scale, self.noise_channels).to(weight_dtype)
                emb = emb + self.map_guidance[key](features)
        return F.silu(emb)

    def _run(self, x, t, h, y, blocks: list[int], cond: dict[str, torch.Tensor] | None = None):
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"UNet built for per-sample shape {self.input_shape}, got input of shape {tuple(x.shape)}")
        emb = self.embedding(t, h, y, x.shape[0], x.device, cond)
        wanted = set(blocks)
        captured: dict[int, torch.Tensor] = {}
        index = 0
        # Down path, keeping every activation as a skip.
        a = self.conv_in(x)
        skips = [a]
        for block in self.enc:
            a = block(a, emb)
            skips.append(a)
            if index in wanted:
                captured[index] = a
            index += 1
        # Up path, concatenating one skip per skip-consuming block.
        for block, takes_skip in zip(self.dec, self._dec_takes_skip):
            if takes_skip:
                a = torch.cat([a, skips.pop()], dim=1)
            a = block(a, emb)
            if index in wanted:
                captured[index] = a
            index += 1
        out = self.conv_out(F.silu(self.norm_out(a)))
        return out, [captured[i] for i in blocks]


@BACKBONES.register("unet", family="unet")
def unet(
    input_shape: tuple[int, ...] | list[int] = (3, 32, 32),
    num_classes: int = 0,
    model_channels: int = 128,
    channel_mult: list[int] | tuple[int, ...] = (2, 2, 2),
    channel_mult_emb: int = 4,
    num_res_blocks: int = 4,
    attn_resolutions: list[int] | tuple[int, ...] = (16,),
    dropout: float = 0.13,
    num_heads: int = 1,
    time_scale: float = 1000.0,
    guidance_conditions: bool = False,
) -> UNet:
    """DDPM++ U-Net with every architecture knob exposed (defaults: the CIFAR-10 configuration).

    ``guidance_conditions``: also condition on the guidance scale and interval (``cond``)."""
    return UNet(
        input_shape,
        num_classes,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        channel_mult_emb=channel_mult_emb,
        num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(attn_resolutions),
        dropout=dropout,
        num_heads=num_heads,
        time_scale=time_scale,
        guidance_conditions=guidance_conditions,
    )


@BACKBONES.register("unet_cifar", family="unet")
def unet_cifar(
    input_shape: tuple[int, ...] | list[int] = (3, 32, 32),
    num_classes: int = 0,
    dropout: float = 0.13,
    time_scale: float = 1000.0,
    guidance_conditions: bool = False,
) -> UNet:
    """EDM's DDPM++ CIFAR-10 U-Net plus an h embedding: 56.1M parameters at (3, 32, 32).

    model_channels 128, channel_mult [2, 2, 2], 4 res blocks per level, attention at 16×16.
    Dropout: EDM 0.13, MeanFlow / ECT 0.2, iCT 0.3."""
    return UNet(
        input_shape,
        num_classes,
        model_channels=128,
        channel_mult=(2, 2, 2),
        channel_mult_emb=4,
        num_res_blocks=4,
        attn_resolutions=(16,),
        dropout=dropout,
        time_scale=time_scale,
        guidance_conditions=guidance_conditions,
    )


@BACKBONES.register("test_unet", family="unet")
def test_unet(
    input_shape: tuple[int, ...] | list[int] = (3, 8, 8),
    num_classes: int = 0,
    dropout: float = 0.0,
    time_scale: float = 1000.0,
    guidance_conditions: bool = False,
) -> UNet:
    """Tiny U-Net for tests: model_channels 16, channel_mult [1, 2], 1 res block, attention at 4×4."""
    shape = tuple(input_shape)
    attn = (shape[-1] // 2,) if len(shape) == 3 else (4,)
    return UNet(
        input_shape,
        num_classes,
        model_channels=16,
        channel_mult=(1, 2),
        channel_mult_emb=2,
        num_res_blocks=1,
        attn_resolutions=attn,
        dropout=dropout,
        time_scale=time_scale,
        guidance_conditions=guidance_conditions,
    )
