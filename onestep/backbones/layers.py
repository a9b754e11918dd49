"""Building blocks shared by the backbones.

Notation: t is the time in [0, 1] (noise at t = 1), h = t - r the interval of the average velocity,
y the class id (``num_classes`` is the null class used for classifier-free guidance dropout).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "timestep_features",
    "TimestepEmbedder",
    "LabelEmbedder",
    "sincos_pos_embed_2d",
    "modulate",
    "resolve_blocks",
    "batch_times",
    "GUIDANCE_KEYS",
    "resolve_guidance",
    "unpatchify",
]

# Guidance conditions a backbone may take through ``cond``: the scale omega (>= 1, 1 = unguided) and
# the interval [t_min, t_max] of times at which guidance applies.
GUIDANCE_KEYS: tuple[str, ...] = ("omega", "t_min", "t_max")
GUIDANCE_DEFAULTS: dict[str, float] = {"omega": 1.0, "t_min": 0.0, "t_max": 1.0}


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of scalar times: (B,) -> (B, dim) = [cos(t·f_k), sin(t·f_k)].

    Frequencies f_k = max_period^(-k / (dim/2)), k = 0 .. dim/2 - 1. Computed in at least float32
    (float64 inputs stay float64 so finite-difference tests keep their precision).
    """
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar time -> vector: sinusoidal features of ``time_scale * t`` then Linear-SiLU-Linear.

    (B,) -> (B, hidden_size).
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, time_scale: float = 1.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.time_scale = float(time_scale)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def reset_parameters(self, std: float = 0.02) -> None:
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t * self.time_scale, self.frequency_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class id -> vector, with one extra row for the null class (id == num_classes).

    ``y=None`` means every sample is the null class. (B,) int64 -> (B, hidden_size).
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.embedding_table.weight, std=std)

    def forward(self, y: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        return self.embedding_table(y.to(device=device, dtype=torch.long))


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid_h * grid_w, dim), row-major token order.

    Half of the channels encode the row, half the column; each half is [sin, cos] of the position
    times frequencies 10000^(-k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(grid_h, dtype=torch.float64)
    cols = torch.arange(grid_w, dtype=torch.float64)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        args = pos.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([encode(rr), encode(cc)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens: x (B, N, D), shift/scale (B, D) -> x·(1 + scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def resolve_blocks(blocks: int | Iterable[int], num_blocks: int) -> list[int]:
    """Normalize requested block indices to 0-based non-negative ints (negatives count from the end).

    Raises ValueError naming the valid range for an index outside [-num_blocks, num_blocks - 1].
    """
    if isinstance(blocks, int):
        blocks = [blocks]
    resolved = []
    for index in blocks:
        if isinstance(index, bool) or not isinstance(index, int):
            if isinstance(index, torch.Tensor) and index.ndim == 0 and not index.is_floating_point():
                index = int(index)
            else:
                raise ValueError(f"block index must be an int, got {type(index).__name__} {index!r}")
        if not -num_blocks <= index < num_blocks:
            raise ValueError(
                f"block index {index} out of range for a backbone with {num_blocks} blocks; "
                f"valid: {-num_blocks} .. {num_blocks - 1}"
            )
        resolved.append(index % num_blocks)
    return resolved


def batch_times(t: torch.Tensor | float, batch_size: int, device: torch.device) -> torch.Tensor:
    """Times as a (B,) tensor: a python number or 0-d tensor is broadcast over the batch."""
    t = torch.as_tensor(t, device=device)
    if not t.is_floating_point():
        t = t.float()
    if t.ndim == 0:
        t = t.expand(batch_size)
    elif t.ndim != 1 or t.shape[0] != batch_size:
        raise ValueError(f"times must have shape ({batch_size},) or be a scalar, got {tuple(t.shape)}")
    return t


def resolve_guidance(
    cond: Mapping[str, Any] | None,
    cond_keys: Sequence[str],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    *,
    owner: str = "backbone",
    option: str = "guidance_conditions=True",
) -> dict[str, torch.Tensor] | None:
    """Validate ``cond`` and return {key: (B,) tensor} for every key in ``cond_keys`` (None if there are none).

    ``cond`` is None or a dict with keys among ``cond_keys``; values are (B,) tensors, 0-d tensors or
    python numbers (broadcast over the batch; numbers are made ``dtype``). Missing keys take the
    unguided defaults omega = 1, t_min = 0, t_max = 1. Values are not range-checked (that would
    synchronise with the device). A backbone without ``cond_keys`` accepts only None or {}.
    """
    if cond is not None and not isinstance(cond, Mapping):
        raise ValueError(
            f"cond must be None or a dict with keys among {', '.join(GUIDANCE_KEYS)}; got {type(cond).__name__}"
        )
    cond = dict(cond or {})
    if not cond_keys:
        if cond:
            raise ValueError(
                f"{owner} was not built with guidance conditions (build it with {option}); "
                f"got cond keys {', '.join(map(str, cond))}"
            )
        return None
    unknown = [k for k in cond if k not in cond_keys]
    if unknown:
        raise ValueError(
            f"unknown cond key(s) {', '.join(map(repr, unknown))} for {owner}; allowed: {', '.join(cond_keys)}"
        )
    out = {}
    for key in cond_keys:
        value = cond.get(key, GUIDANCE_DEFAULTS[key])
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value, dtype=dtype, device=device)
        out[key] = batch_times(value, batch_size, device)
    return out


def unpatchify(tokens: torch.Tensor, channels: int, patch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Patch tokens back to an image: (B, N, p·p·C) -> (B, C, H, W).

    Tokens are row-major over the (H/p, W/p) grid; each token's p·p·C values are ordered
    (row-in-patch, column-in-patch, channel).
    """
    p = patch_size
    grid_h, grid_w = grid_size
    x = tokens.reshape(tokens.shape[0], grid_h, grid_w, p, p, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)
    return x.reshape(tokens.shape[0], channels, grid_h * p, grid_w * p)


def check_input_shape(input_shape: Sequence[int], ndim: int | tuple[int, ...], what: str) -> tuple[int, ...]:
    """Validate a per-sample shape: positive ints with the allowed number of dimensions."""
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    shape = tuple(input_shape)
    if len(shape) not in ndims or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{what} needs a {want} input_shape of positive ints, got {input_shape!r}")
    return shape


class TimeConditioned:
    """Mixin for the adaLN-style backbones (DiT, MLP): the condition vector

        c = emb_t(t) + emb_h(h) [+ emb_y(y)] [+ emb_ω(1 − 1/ω) + emb_tmin(t_min) + emb_tmax(t_max)]

    The embedders are attributes of the backbone itself (``t_embedder``, ``h_embedder``,
    ``y_embedder``, ``guidance_embedders``), so checkpoints keep their keys."""

    def add_time_embedders(self, width: int, frequency_size: int, time_scale: float, num_classes: int) -> None:
        self.t_embedder = TimestepEmbedder(width, frequency_size, time_scale)
        self.h_embedder = TimestepEmbedder(width, frequency_size, time_scale)
        self.y_embedder = LabelEmbedder(num_classes, width) if num_classes > 0 else None

    def add_guidance_embedders(
        self, enabled: bool, width: int, frequency_size: int, time_scale: float, normal_init: bool = False
    ) -> None:
        """Three more scalar embedders (1 − 1/ω, t_min, t_max) when ``enabled``, their last Linear at zero
        so a freshly built guided net computes exactly the unguided function."""
        self.cond_keys = GUIDANCE_KEYS if enabled else ()
        self.guidance_embedders = None
        if enabled:
            self.guidance_embedders = nn.ModuleDict(
                {key: TimestepEmbedder(width, frequency_size, time_scale) for key in GUIDANCE_KEYS}
            )
            self.reset_guidance_embedders(normal_init)

    def reset_guidance_embedders(self, normal_init: bool = False) -> None:
        for embedder in (self.guidance_embedders or {}).values():
            if normal_init:
                embedder.reset_parameters()
            nn.init.zeros_(embedder.mlp[-1].weight)
            nn.init.zeros_(embedder.mlp[-1].bias)

    def condition(
        self, t, h, y, batch_size: int, device: torch.device, cond: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """c (B, width); ``cond`` is the resolved dict of (B,) tensors (guided nets only)."""
        t = batch_times(t, batch_size, device)
        h = torch.zeros_like(t) if h is None else batch_times(h, batch_size, device)
        c = self.t_embedder(t) + self.h_embedder(h)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, batch_size, device)
        if self.guidance_embedders is not None and cond is not None:
            emb = self.guidance_embedders
            c = c + emb["omega"](1 - 1 / cond["omega"]) + emb["t_min"](cond["t_min"]) + emb["t_max"](cond["t_max"])
        return c


class BlockFeatures:
    """Mixin for backbones: ``forward`` and ``forward_features`` on top of one
    ``_run(x, t, h, y, blocks, cond) -> (out, [features])`` pass, so the two can never disagree.

    ``cond`` reaches ``_run`` already resolved (``resolve_guidance``): None for a backbone whose
    ``cond_keys`` is empty, else a dict of (B,) tensors with every key in ``cond_keys``.
    """

    num_blocks: int
    cond_keys: tuple[str, ...] = ()
    # How to build the backbone with guidance conditions (named in the error for a stray ``cond``).
    guidance_option: str = "guidance_conditions=True"

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        h: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        cond: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """x (B, ...), t (B,), h = t - r (B,) or None, y (B,) or None -> like x.

        ``cond``: None or {"omega", "t_min", "t_max"} -> (B,) tensors or scalars (guided backbones
        only; missing keys mean omega = 1, t_min = 0, t_max = 1).
        """
        return self._run(x, t, h, y, [], self._resolve_cond(cond, x))[0]

    def forward_features(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        h: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        blocks: int | Iterable[int],
        cond: Mapping[str, Any] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Output and the activations after each requested block (negative indices from the end)."""
        return self._run(x, t, h, y, resolve_blocks(blocks, self.num_blocks), self._resolve_cond(cond, x))

    def _resolve_cond(self, cond: Mapping[str, Any] | None, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
        dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
        return resolve_guidance(
            cond, self.cond_keys, x.shape[0], x.device, dtype, owner=type(self).__name__, option=self.guidance_option
        )
