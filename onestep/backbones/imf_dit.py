"""Improved-MeanFlow (iMF) DiT: in-context conditioning, RoPE, SwiGLU, and an auxiliary v-head.

Notation: x (B, C, H, W) the network input (z_t in the objectives), t (B,) time in [0, 1],
h = t - r (B,) the interval, y (B,) class ids (``num_classes`` = null class), and the guidance
conditions ``cond`` = {"omega": ω, "t_min", "t_max"} (ω ≥ 1 the guidance scale, [t_min, t_max] the
interval where guidance applies; defaults ω = 1, [0, 1], i.e. unguided).

**The network ignores t.** Like the released iMF code it conditions on h only (plus y, ω, t_min,
t_max); ``t`` is accepted for the backbone contract and shape-checked, nothing else. Hence
∂u/∂t = 0 and a JVP with tangent (dz, dt, dh) sees only dz and dh.

Sequence (no adaLN, no absolute position embedding)::

    [class tokens (8) | ω tokens (4) | t_min tokens (2) | t_max tokens (2) | time tokens (4) | patches]

Each prefix group is a learnable token bank (n, D), initialised N(0, 1/D), plus one embedding vector
added to every token of the group: the class through Embedding(num_classes + 1, D); the scalars
through a ``TimestepEmbedder`` (256 sinusoidal frequencies, [cos | sin], Linear-SiLU-Linear) of
1 − 1/ω, t_min, t_max and h (unscaled). With ``num_classes == 0`` the class bank stays (learnable
register tokens with no embedding added, so the sequence layout is the same as with classes) and y
is ignored. Patches come from a p×p stride-p convolution, row-major.

Position: 1-D rotary embedding (θ = 10000) over the whole sequence, positions 0 .. L−1, rotating the
interleaved pairs (x[2i], x[2i+1]) of every head's q and k after a per-head RMSNorm.

Block: x += attn(RMSNorm(x)) ⊙ attn_scale;  x += SwiGLU(RMSNorm(x)) ⊙ mlp_scale, with zero-initialised
vector gates, bias-free q/k/v/out projections and SwiGLU w2(silu(w1 x) ⊙ w3 x) of hidden width
int(D·mlp_ratio) (mlp_ratio 8/3). Final layer: RMSNorm -> Linear(D, p²·C) (zero-initialised) on the
patch tokens, then the same unpatchify as ``dit.py``. RMSNorm: ε = 1e-6, learnable scale.

Heads: ``depth − aux_head_depth`` trunk blocks, then the u-head (``aux_head_depth`` blocks + final
layer) gives the average velocity u. With ``aux_head=True`` a second head (``v_head``: its own
``aux_head_depth`` blocks + final layer) on the same trunk output gives an instantaneous velocity v,
used only in training. ``forward`` returns u; ``forward_aux`` returns (u, v, features) from one
trunk pass; ``forward_v`` returns v alone (trunk + v-head, no u-head). All v-head weights live
under ``v_head.``; ``inference_state_dict`` drops them so an
``aux_head=False`` model loads a training checkpoint with strict loading.

Features (``forward_features`` / ``forward_aux(blocks=...)``): block indices 0 .. depth−1 run over
the trunk then the u-head blocks (the main u path); a feature is the **patch tokens** (B, N, D)
after that block, without the prefix tokens. ``encoder_blocks = (depth // 4,)``.

Initialisation: Linear weights N(0, init_constant²/fan_in) with init_constant 0.32 (σ² ≈ 0.1/fan_in)
and zero biases; embedders (timestep MLPs, class table) N(0, 1/fan_in) (table: 1/D); patch
convolution xavier-uniform, zero bias; RMSNorm scales 1; gates and final layers 0.

Attention goes through ``attention.attention`` so ``torch.func.jvp`` works inside
``jvp_attention(kernel)`` for every kernel; RoPE and RMSNorm are plain elementwise ops.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import BACKBONES
from .attention import attention
from .layers import (
    GUIDANCE_KEYS,
    BlockFeatures,
    LabelEmbedder,
    TimestepEmbedder,
    batch_times,
    check_input_shape,
    resolve_blocks,
    unpatchify,
)

__all__ = [
    "IMFDiT",
    "IMFBlock",
    "RMSNorm",
    "RoPEAttention",
    "SwiGLU",
    "IMF_DIT_SIZES",
    "rope_angles",
    "apply_rope",
    "inference_state_dict",
    "V_HEAD_PREFIX",
]

V_HEAD_PREFIX = "v_head."


class RMSNorm(nn.Module):
    """x / sqrt(mean(x², last dim) + eps) · weight, the normalisation computed in >= float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rope_angles(
    seq_len: int, head_dim: int, theta: float = 10000.0, *, device=None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles m·θ^(−2i/d): two (seq_len, head_dim / 2) tensors.

    Computed in float64, then cast to ``dtype``.
    """
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None] * freqs[None, :]
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: x (..., L, d), cos/sin (L, d/2) -> like x.

    The pair (x[2i], x[2i+1]) at position m, read as the complex number x[2i] + i·x[2i+1], is
    multiplied by exp(i·angle[m, i]). Computed in >= float32 and cast back to x's dtype.
    """
    work = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(work).unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(work), sin.to(work)
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class RoPEAttention(nn.Module):
    """Self-attention with per-head qk RMSNorm and 1-D RoPE: (B, L, D), cos/sin (L, d/2) -> (B, L, D).

    Bias-free q/k/v/out projections; the attention itself is ``attention.attention`` (JVP-able).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} must be divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        split = (batch, tokens, self.num_heads, self.head_dim)
        q = self.q_norm(self.q_proj(x).reshape(split)).transpose(1, 2)  # (B, heads, L, d)
        k = self.k_norm(self.k_proj(x).reshape(split)).transpose(1, 2)
        v = self.v_proj(x).reshape(split).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.out_proj(out)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) ⊙ w3 x), bias-free: (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class IMFBlock(nn.Module):
    """x += attn(RMSNorm(x)) ⊙ attn_scale; x += SwiGLU(RMSNorm(x)) ⊙ mlp_scale (gates start at 0)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 8 / 3):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = RoPEAttention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))
        self.attn_scale = nn.Parameter(torch.zeros(dim))
        self.mlp_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin) * self.attn_scale
        return x + self.mlp(self.norm2(x)) * self.mlp_scale


class IMFFinalLayer(nn.Module):
    """RMSNorm -> Linear(D, p²·C): (B, N, D) -> (B, N, p²·C)."""

    def __init__(self, dim: int, patch_size: int, channels: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class AuxHead(nn.Module):
    """The v-head: ``aux_head_depth`` blocks and a final layer on the trunk output."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, depth: int, patch_size: int, channels: int):
        super().__init__()
        self.blocks = nn.ModuleList(IMFBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = IMFFinalLayer(dim, patch_size, channels)


def inference_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an IMFDiT state dict without the v-head keys (those under ``v_head.``), loadable
    with strict ``load_state_dict`` into the same model built with ``aux_head=False``."""
    return {k: v for k, v in state_dict.items() if not k.startswith(V_HEAD_PREFIX)}


class IMFDiT(BlockFeatures, nn.Module):
    """iMF in-context DiT: u(x | h, y, ω, t_min, t_max), ignoring t, with an optional v-head (every knob).

    ``forward(x, t, h=None, y=None, *, cond=None)``: (B, C, H, W) -> u (B, C, H, W); ``h=None`` means
    h = 0, ``y=None`` the null class, ``cond=None`` ω = 1 on [0, 1].
    ``forward_aux(..., cond=None, blocks=())`` -> (u, v, [features]) from one trunk pass (needs
    ``aux_head=True``). ``cond_keys`` is always ("omega", "t_min", "t_max").
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] | list[int] = (4, 32, 32),
        num_classes: int = 0,
        patch_size: int = 2,
        depth: int = 12,
        hidden_size: int = 768,
        num_heads: int = 12,
        mlp_ratio: float = 8 / 3,
        aux_head: bool = True,
        aux_head_depth: int = 8,
        num_class_tokens: int = 8,
        num_omega_tokens: int = 4,
        num_interval_tokens: int = 2,
        num_time_tokens: int = 4,
        frequency_size: int = 256,
        rope_theta: float = 10000.0,
        init_constant: float = 0.32,
    ):
        super().__init__()
        channels, height, width = check_input_shape(input_shape, 3, "IMFDiT")
        if patch_size < 1 or height % patch_size or width % patch_size:
            raise ValueError(
                f"IMFDiT input_shape {tuple(input_shape)}: height and width must be divisible by "
                f"patch_size {patch_size}"
            )
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(
                f"IMFDiT hidden_size {hidden_size} must split into num_heads {num_heads} heads "
                f"of even size (rotary pairs)"
            )
        if depth < 1 or not 0 <= aux_head_depth <= depth:
            raise ValueError(
                f"IMFDiT needs depth >= 1 and 0 <= aux_head_depth <= depth, "
                f"got depth={depth}, aux_head_depth={aux_head_depth}"
            )
        counts = dict(
            num_class_tokens=num_class_tokens,
            num_omega_tokens=num_omega_tokens,
            num_interval_tokens=num_interval_tokens,
            num_time_tokens=num_time_tokens,
        )
        bad = [f"{k}={v}" for k, v in counts.items() if v < 1]
        if bad:
            raise ValueError(f"IMFDiT token counts must be >= 1, got {', '.join(bad)}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        self.input_shape = (channels, height, width)
        self.num_classes = int(num_classes)
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.grid_size = (height // patch_size, width // patch_size)
        self.num_blocks = depth
        self.aux_head_depth = aux_head_depth
        self.trunk_depth = depth - aux_head_depth
        self.encoder_blocks = (depth // 4,)
        self.cond_keys = GUIDANCE_KEYS
        self.has_aux_head = bool(aux_head)
        self.rope_theta = float(rope_theta)
        self.init_constant = float(init_constant)

        self.x_embedder = nn.Conv2d(channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        self.omega_embedder = TimestepEmbedder(hidden_size, frequency_size)
        self.t_min_embedder = TimestepEmbedder(hidden_size, frequency_size)
        self.t_max_embedder = TimestepEmbedder(hidden_size, frequency_size)
        self.h_embedder = TimestepEmbedder(hidden_size, frequency_size)
        self.class_tokens = nn.Parameter(torch.empty(num_class_tokens, hidden_size))
        self.omega_tokens = nn.Parameter(torch.empty(num_omega_tokens, hidden_size))
        self.t_min_tokens = nn.Parameter(torch.empty(num_interval_tokens, hidden_size))
        self.t_max_tokens = nn.Parameter(torch.empty(num_interval_tokens, hidden_size))
        self.time_tokens = nn.Parameter(torch.empty(num_time_tokens, hidden_size))
        self.num_prefix_tokens = num_class_tokens + num_omega_tokens + 2 * num_interval_tokens + num_time_tokens
        self.seq_len = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

        self.blocks = nn.ModuleList(IMFBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = IMFFinalLayer(hidden_size, patch_size, channels)
        self.v_head = (
            AuxHead(hidden_size, num_heads, mlp_ratio, aux_head_depth, patch_size, channels) if aux_head else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """iMF initialisation (module docstring)."""
        embedders = [self.omega_embedder, self.t_min_embedder, self.t_max_embedder, self.h_embedder]
        embedder_modules = {m for e in embedders for m in e.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear):
                gain = 1.0 if module in embedder_modules else self.init_constant
                nn.init.normal_(module.weight, std=gain / math.sqrt(module.in_features))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, IMFBlock):
                nn.init.zeros_(module.attn_scale)
                nn.init.zeros_(module.mlp_scale)
        weight = self.x_embedder.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=1 / math.sqrt(self.hidden_size))
        for bank in (self.class_tokens, self.omega_tokens, self.t_min_tokens, self.t_max_tokens, self.time_tokens):
            nn.init.normal_(bank, std=1 / math.sqrt(self.hidden_size))
        finals = [self.final_layer] + ([self.v_head.final_layer] if self.v_head is not None else [])
        for final in finals:
            nn.init.zeros_(final.linear.weight)
            nn.init.zeros_(final.linear.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, p·p·C) -> (B, C, H, W), the same convention as ``DiT.unpatchify``."""
        return unpatchify(tokens, self.input_shape[0], self.patch_size, self.grid_size)

    def sequence(self, x: torch.Tensor, h, y, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Prefix tokens and patch tokens: (B, num_prefix_tokens + N, D). ``cond`` resolved."""
        batch, device = x.shape[0], x.device
        patches = self.x_embedder(x).flatten(2).transpose(1, 2)
        ref = cond["omega"]
        h = torch.zeros_like(ref) if h is None else batch_times(h, batch, device)

        def group(bank: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
            bank = bank.unsqueeze(0).expand(batch, -1, -1)
            return bank if emb is None else bank + emb.unsqueeze(1)

        y_emb = self.y_embedder(y, batch, device) if self.y_embedder is not None else None
        prefix = torch.cat(
            [
                group(self.class_tokens, y_emb),
                group(self.omega_tokens, self.omega_embedder(1 - 1 / cond["omega"])),
                group(self.t_min_tokens, self.t_min_embedder(cond["t_min"])),
                group(self.t_max_tokens, self.t_max_embedder(cond["t_max"])),
                group(self.time_tokens, self.h_embedder(h)),
            ],
            dim=1,
        )
        return torch.cat([prefix.to(patches.dtype), patches], dim=1)

    def _rope(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
        return rope_angles(self.seq_len, self.head_dim, self.rope_theta, device=x.device, dtype=dtype)

    def _forward_all(self, x, t, h, y, blocks: list[int], cond, with_v: bool, with_u: bool = True):
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"IMFDiT built for per-sample shape {self.input_shape}, got input of shape {tuple(x.shape)}"
            )
        batch_times(t, x.shape[0], x.device)  # t is not an input of this network; only its shape is checked
        if cond is None:  # _run called directly
            cond = self._resolve_cond(None, x)
        seq = self.sequence(x, h, y, cond)
        cos, sin = self._rope(x)
        prefix = self.num_prefix_tokens
        wanted = set(blocks)
        captured: dict[int, torch.Tensor] = {}
        trunk_out = seq
        for index, block in enumerate(self.blocks):
            if index == self.trunk_depth:
                trunk_out = seq
                if not with_u:
                    break
            seq = block(seq, cos, sin)
            if index in wanted:
                captured[index] = seq[:, prefix:]
        if self.trunk_depth == self.num_blocks:
            trunk_out = seq
        u = self.unpatchify(self.final_layer(seq[:, prefix:])) if with_u else None
        v = None
        if with_v:
            v_seq = trunk_out
            for block in self.v_head.blocks:
                v_seq = block(v_seq, cos, sin)
            v = self.unpatchify(self.v_head.final_layer(v_seq[:, prefix:]))
        return u, v, [captured[i] for i in blocks]

    def _run(self, x, t, h, y, blocks: list[int], cond: dict[str, torch.Tensor] | None = None):
        u, _, feats = self._forward_all(x, t, h, y, blocks, cond, with_v=False)
        return u, feats

    def forward_aux(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        h: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        cond: Mapping[str, Any] | None = None,
        blocks: int | Iterable[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(u, v, [features]): average velocity, auxiliary instantaneous velocity and the patch tokens
        after the requested blocks of the u path, all from one trunk pass."""
        if self.v_head is None:
            raise ValueError("IMFDiT was built without the auxiliary v-head (aux_head=False); forward_aux needs it")
        return self._forward_all(
            x, t, h, y, resolve_blocks(blocks, self.num_blocks), self._resolve_cond(cond, x), with_v=True
        )

    def forward_v(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        h: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        cond: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """The v-head's instantaneous velocity alone: the trunk and the v-head, skipping the u-head
        (the same v as ``forward_aux``; what the training targets query, at h = 0)."""
        if self.v_head is None:
            raise ValueError("IMFDiT was built without the auxiliary v-head (aux_head=False); forward_v needs it")
        return self._forward_all(x, t, h, y, [], self._resolve_cond(cond, x), with_v=True, with_u=False)[1]

    def inference_parameters(self) -> int:
        """Parameters of the inference model (without the v-head, which only training uses)."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith(V_HEAD_PREFIX))

    def inference_state_dict(self) -> dict[str, Any]:
        """This model's state dict without the v-head (for an ``aux_head=False`` model)."""
        return inference_state_dict(self.state_dict())


# Sizes of the iMF paper / released code: depth (trunk + u-head), width, heads, patch; v-head 8 blocks.
IMF_DIT_SIZES: dict[str, dict[str, int]] = {
    "imf_dit_b_2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2, aux_head_depth=8),
    "imf_dit_m_2": dict(depth=24, hidden_size=768, num_heads=12, patch_size=2, aux_head_depth=8),
    "imf_dit_l_2": dict(depth=32, hidden_size=1024, num_heads=16, patch_size=2, aux_head_depth=8),
    "imf_dit_xl_2": dict(depth=48, hidden_size=1024, num_heads=16, patch_size=2, aux_head_depth=8),
    "test_imf_dit": dict(depth=3, hidden_size=32, num_heads=2, patch_size=2, aux_head_depth=2),
}


# The generic factory is the class itself (every knob; defaults: B/2 with the v-head).
BACKBONES.register("imf_dit", family="imf_dit")(IMFDiT)


def _register_size(name: str, doc: str, default_shape: tuple[int, ...]) -> None:
    def factory(
        input_shape: tuple[int, ...] | list[int] = default_shape,
        num_classes: int = 0,
        aux_head: bool = True,
    ) -> IMFDiT:
        return IMFDiT(input_shape, num_classes, aux_head=aux_head, **IMF_DIT_SIZES[name])

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    BACKBONES.register(name, family="imf_dit")(factory)


_SIZE_DOCS = {
    "imf_dit_b_2": "iMF-B/2: depth 12 (4 trunk + 8 u-head), width 768, 12 heads, patch 2; v-head 8 blocks "
    "(1000 classes at 4x32x32: 88.9M inference, 145.6M with the v-head).",
    "imf_dit_m_2": "iMF-M/2: depth 24 (16 + 8), width 768, 12 heads, patch 2 (173.9M inference, 230.6M training).",
    "imf_dit_l_2": "iMF-L/2: depth 32 (24 + 8), width 1024, 16 heads, patch 2 (409.1M inference, 509.8M training).",
    "imf_dit_xl_2": "iMF-XL/2: depth 48 (40 + 8), width 1024, 16 heads, patch 2 (610.4M inference, 711.1M training).",
    "test_imf_dit": "Tiny iMF DiT for tests: depth 3 (1 + 2), width 32, 2 heads, patch 2, v-head 2 blocks.",
}
for _name, _doc in _SIZE_DOCS.items():
    _register_size(_name, _doc, (4, 8, 8) if _name == "test_imf_dit" else (4, 32, 32))
