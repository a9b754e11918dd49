"""Building blocks shared by the backbones.

Notation: t is the time in [0, 1] (noise at t = 1), h = t - r the interval of the average velocity,
y the class id (``num_classes`` is the null class used for classifier-free guidance dropout).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

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
]


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


def check_input_shape(input_shape: Sequence[int], ndim: int | tuple[int, ...], what: str) -> tuple[int, ...]:
    """Validate a per-sample shape: positive ints with the allowed number of dimensions."""
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    shape = tuple(input_shape)
    if (
        len(shape) not in ndims
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{what} needs a {want} input_shape of positive ints, got {input_shape!r}")
    return shape


class BlockFeatures:
    """Mixin for backbones: ``forward`` and ``forward_features`` on top of one ``_run(x, t, h, y,
    blocks) -> (out, [features])`` pass, so the two can never disagree."""

    num_blocks: int

    def forward(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, ...), t (B,), h = t - r (B,) or None, y (B,) or None -> like x."""
        return self._run(x, t, h, y, [])[0]

    def forward_features(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None = None,
                         y: torch.Tensor | None = None, *, blocks: int | Iterable[int]
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Output and the activations after each requested block (negative indices from the end)."""
        return self._run(x, t, h, y, resolve_blocks(blocks, self.num_blocks))
