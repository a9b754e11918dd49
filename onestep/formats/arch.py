"""The official DiT / SiT / REPA-SiT state-dict layout: architecture from tensor shapes, and checks.

Keys of the official ``models.py`` (D width, C input channels, p patch, N = g² tokens, K classes,
F = 256 time frequencies, M = 4·D MLP width, C_out = C, or 2·C with a learned Σ)::

    x_embedder.proj.weight [D, C, p, p]   x_embedder.proj.bias [D]       pos_embed [1, N, D]
    t_embedder.mlp.0.weight [D, F]        t_embedder.mlp.2.weight [D, D]  (+ biases [D])
    y_embedder.embedding_table.weight [K + 1, D]   (row K = the null class)
    blocks.{i}.attn.qkv [3D, D]  attn.proj [D, D]  mlp.fc1 [M, D]  mlp.fc2 [D, M]
    blocks.{i}.adaLN_modulation.1 [6D, D]          (+ biases)
    final_layer.adaLN_modulation.1 [2D, D]   final_layer.linear [p²·C_out, D]   (+ biases)
    REPA only: projectors.{j}.{0,2,4}.weight / .bias (an MLP on the tokens; not part of v)

The head count is not in the shapes: the standard widths give it (S 384/6, B 768/12, L 1024/16,
XL 1152/16), other widths need it explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import ConfigError
from .reading import block_indices

__all__ = [
    "OfficialArch",
    "STANDARD_HEADS",
    "infer_arch",
    "expected_shapes",
    "check_state",
    "official_pos_embed",
    "check_pos_embed",
]

STANDARD_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
_SIZE_NAMES = "S 384/6, B 768/12, L 1024/16, XL 1152/16"


@dataclass(frozen=True)
class OfficialArch:
    """What the shapes of an official file say (plus the head count)."""

    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int
    in_channels: int
    out_channels: int
    grid_size: int
    num_classes: int
    mlp_hidden: int
    frequency_size: int
    has_projectors: bool = False

    @property
    def input_shape(self) -> tuple[int, int, int]:
        side = self.grid_size * self.patch_size
        return (self.in_channels, side, side)

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    def dit_kwargs(self) -> dict:
        """Arguments of onestep's ``DiT`` for the same network (time_scale 1: the raw time input)."""
        return dict(
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            patch_size=self.patch_size,
            depth=self.depth,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_hidden / self.hidden_size,
            time_scale=1.0,
            frequency_size=self.frequency_size,
        )


def _shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _get(state: dict[str, torch.Tensor], key: str, ndim: int, expected: str, where: str) -> torch.Size:
    if key not in state:
        raise ConfigError(f"{where}: missing key '{key}' (expected shape {expected})")
    shape = state[key].shape
    if len(shape) != ndim:
        raise ConfigError(f"{where}: key '{key}' has shape {_shape(shape)}, expected {expected}")
    return shape


def infer_arch(
    state: dict[str, torch.Tensor],
    where: str,
    *,
    num_heads: int | None = None,
    default_heads: int | None = None,
    out_factors: tuple[int, ...] = (1, 2),
) -> OfficialArch:
    """Read the architecture from the shapes (module docstring); ``out_factors``: allowed C_out / C.

    Heads: ``num_heads`` if given, else the standard size's, else ``default_heads``, else an error.
    """
    d, c, p, p2 = _get(state, "x_embedder.proj.weight", 4, "[D, C, p, p]", where)
    if p != p2:
        raise ConfigError(
            f"{where}: key 'x_embedder.proj.weight' has shape {_shape((d, c, p, p2))}, expected [D, C, p, p]"
        )
    _, n, _ = _get(state, "pos_embed", 3, f"[1, N, {d}]", where)
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ConfigError(f"{where}: key 'pos_embed' has {n} tokens, not a square grid")
    indices = block_indices(state)
    if not indices:
        raise ConfigError(f"{where}: missing key 'blocks.0.attn.qkv.weight' (expected shape [{3 * d}, {d}])")
    rows, _ = _get(state, "y_embedder.embedding_table.weight", 2, f"[K + 1, {d}]", where)
    _, freq = _get(state, "t_embedder.mlp.0.weight", 2, f"[{d}, 256]", where)
    mlp_hidden, _ = _get(state, "blocks.0.mlp.fc1.weight", 2, f"[{4 * d}, {d}]", where)
    out_rows, _ = _get(state, "final_layer.linear.weight", 2, f"[p²·C_out, {d}]", where)
    allowed = " or ".join(f"[{p * p * c * f}, {d}]" for f in out_factors)
    if out_rows % (p * p) or out_rows // (p * p) not in [c * f for f in out_factors]:
        raise ConfigError(
            f"{where}: key 'final_layer.linear.weight' has shape {_shape(state['final_layer.linear.weight'].shape)}, "
            f"expected {allowed} (output channels {' or '.join(str(c * f) for f in out_factors)})"
        )
    if rows < 2:
        raise ConfigError(
            f"{where}: key 'y_embedder.embedding_table.weight' has {rows} rows; expected K + 1 (K classes + null)"
        )
    if freq % 2:
        raise ConfigError(f"{where}: key 't_embedder.mlp.0.weight' has an odd frequency size {freq}")
    if num_heads is None:
        num_heads = STANDARD_HEADS.get(d, default_heads)
        if num_heads is None:
            raise ConfigError(
                f"{where}: width {d} is not a standard DiT/SiT size ({_SIZE_NAMES}); give the head "
                f"count (num_heads=..., or the spec suffix '#heads=N')"
            )
    if num_heads < 1 or d % num_heads:
        raise ConfigError(f"{where}: {num_heads} heads do not divide the width {d}")
    if int(d * (mlp_hidden / d)) != mlp_hidden:
        raise ConfigError(f"{where}: MLP width {mlp_hidden} is not representable as int(D * mlp_ratio) for D = {d}")
    has_projectors = any(k.startswith("projectors.") for k in state)
    return OfficialArch(
        hidden_size=d,
        depth=indices[-1] + 1,
        num_heads=num_heads,
        patch_size=p,
        in_channels=c,
        out_channels=out_rows // (p * p),
        grid_size=grid,
        num_classes=rows - 1,
        mlp_hidden=mlp_hidden,
        frequency_size=freq,
        has_projectors=has_projectors,
    )


def expected_shapes(arch: OfficialArch) -> dict[str, tuple[int, ...]]:
    """Every key of the official network (projectors excluded) and its shape, in module order."""
    d, m, p = arch.hidden_size, arch.mlp_hidden, arch.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "x_embedder.proj.weight": (d, arch.in_channels, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, arch.frequency_size),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (arch.num_classes + 1, d),
        "pos_embed": (1, arch.grid_size**2, d),
    }
    for i in range(arch.depth):
        for name, shape in (
            ("attn.qkv", (3 * d, d)),
            ("attn.proj", (d, d)),
            ("mlp.fc1", (m, d)),
            ("mlp.fc2", (d, m)),
            ("adaLN_modulation.1", (6 * d, d)),
        ):
            shapes[f"blocks.{i}.{name}.weight"] = shape
            shapes[f"blocks.{i}.{name}.bias"] = shape[:1]
    out = p * p * arch.out_channels
    shapes.update(
        {
            "final_layer.linear.weight": (out, d),
            "final_layer.linear.bias": (out,),
            "final_layer.adaLN_modulation.1.weight": (2 * d, d),
            "final_layer.adaLN_modulation.1.bias": (2 * d,),
        }
    )
    return shapes


def check_state(
    state: dict[str, torch.Tensor], arch: OfficialArch, where: str, *, allow_projectors: bool = False
) -> None:
    """One ConfigError line for the first missing, mis-shaped or unexpected key."""
    shapes = expected_shapes(arch)
    for key, shape in shapes.items():
        if key not in state:
            raise ConfigError(f"{where}: missing key '{key}' (expected shape {_shape(shape)})")
        if tuple(state[key].shape) != shape:
            raise ConfigError(f"{where}: key '{key}' has shape {_shape(state[key].shape)}, expected {_shape(shape)}")
        if not state[key].is_floating_point():
            raise ConfigError(f"{where}: key '{key}' has dtype {state[key].dtype}, expected a floating-point tensor")
    for key, value in state.items():
        if key in shapes:
            continue
        if key.startswith("projectors."):
            if not allow_projectors:
                raise ConfigError(
                    f"{where}: unexpected key '{key}' {_shape(value.shape)}: a REPA projector "
                    f"(use the 'repa_sit' format)"
                )
            if key.endswith(".0.weight") and value.ndim == 2 and value.shape[1] != arch.hidden_size:
                raise ConfigError(
                    f"{where}: key '{key}' has shape {_shape(value.shape)}, expected [*, {arch.hidden_size}]"
                )
            continue
        raise ConfigError(f"{where}: unexpected key '{key}' {_shape(value.shape)}")


def official_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """The official (MAE) 2-D sin-cos table, (grid², dim) float64: token i·g + j -> [E(j) | E(i)].

    The first dim/2 channels encode the column j, the last dim/2 the row i;
    E(q) = [sin(q·ω_k) | cos(q·ω_k)], ω_k = 10000^(−k / (dim/4)).
    """
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    index = torch.arange(grid * grid)
    row, col = (index // grid).double(), (index % grid).double()

    def encode(q: torch.Tensor) -> torch.Tensor:
        args = q[:, None] * omega[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([encode(col), encode(row)], dim=1)


def check_pos_embed(state: dict[str, torch.Tensor], arch: OfficialArch, where: str, atol: float = 1e-4) -> None:
    """The file's pos_embed must be the fixed official table (the converted net recomputes it)."""
    reference = official_pos_embed(arch.hidden_size, arch.grid_size)
    deviation = (state["pos_embed"][0].double() - reference).abs().max().item()
    if not deviation <= atol:
        raise ConfigError(
            f"{where}: key 'pos_embed' is not the fixed 2-D sin-cos table of the official code "
            f"(max deviation {deviation:.3g} > {atol:g})"
        )
