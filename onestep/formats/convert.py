"""Official DiT / SiT weights -> onestep ``DiT`` weights (``onestep/backbones/dit.py``).

``official_to_onestep`` gives a state dict for ``DiT(**arch.dit_kwargs())`` whose
``net(x, s, h, y)`` equals the official ``model(x, s, y)[:, :C]`` for every raw time input s
(DDPM index or SiT/REPA time) and every h:

* names: ``x_embedder.proj.* -> x_embedder.*``; everything else keeps its name. Both codes build
  attention as ``qkv.reshape(B, N, 3, heads, D/heads)`` (features [q | k | v], head-major) and
  the MLP as fc1 -> tanh-GELU -> fc2, so qkv and MLP weights copy unchanged, as do the adaLN
  chunk orders (shift, scale, gate ×2; final: shift, scale).
* learned Σ: the final linear's rows are ordered (p_row, p_col, channel), channel fastest, in
  both unpatchify conventions (official ``'nhwpqc->nchpwq'``, onestep's reshape + permute); only
  the rows of channels 0..C-1 are kept.
* position embedding: the official table is [E(col) | E(row)], onestep's ``sincos_pos_embed_2d``
  is [E(row) | E(col)] (same E). onestep's is a fixed buffer, so instead the whole residual stream
  is permuted: onestep channel i carries official channel π(i) (the two halves swapped). Every
  read from the stream is a Linear (qkv, fc1, final linear: permute input columns) after a
  LayerNorm without affine (permutation-equivariant) modulated by shift/scale (permute those rows);
  every write is a Linear or the patch Conv (permute output rows, and the gates). The condition
  vector c is not part of the stream and is untouched. The permuted network is exactly the same
  function (tested, also with random permutations).
* h_embedder (absent from the official files): first Linear = the file's t_embedder first
  Linear, last Linear zero, so emb_h ≡ 0 and h has no effect until trained.
"""

from __future__ import annotations

import math

import torch

from ..backbones.dit import DiT
from ..backbones.layers import sincos_pos_embed_2d
from .arch import OfficialArch

__all__ = [
    "official_to_onestep",
    "residual_permutation",
    "permute_residual",
    "fold_time_flip",
    "negate_output",
    "build_dit",
    "time_flip_matrix",
]


def residual_permutation(dim: int) -> torch.Tensor:
    """π with onestep channel i = official channel π[i]: the halves [col | row] swapped to [row | col]."""
    half = dim // 2
    return torch.cat([torch.arange(half, dim), torch.arange(half)])


def _rows(weight: torch.Tensor, perm: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """Permute the output rows of a Linear whose output is ``chunks`` stream-sized pieces."""
    shaped = weight.reshape(chunks, -1, *weight.shape[1:])
    return shaped[:, perm].reshape(weight.shape)


def permute_residual(state: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """onestep DiT weights -> the same function on the residual stream with channels reordered by perm.

    New stream channel i = old stream channel perm[i] (so the position buffer must be
    ``pos_embed[..., perm]``). Keys not touching the stream are copied.
    """
    out = dict(state)
    out["x_embedder.weight"] = state["x_embedder.weight"][perm]
    out["x_embedder.bias"] = state["x_embedder.bias"][perm]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        for suffix in ("weight", "bias"):
            out[b + f"adaLN_modulation.1.{suffix}"] = _rows(state[b + f"adaLN_modulation.1.{suffix}"], perm, 6)
            out[b + f"attn.proj.{suffix}"] = state[b + f"attn.proj.{suffix}"][perm]
            out[b + f"mlp.fc2.{suffix}"] = state[b + f"mlp.fc2.{suffix}"][perm]
        out[b + "attn.qkv.weight"] = state[b + "attn.qkv.weight"][:, perm]
        out[b + "mlp.fc1.weight"] = state[b + "mlp.fc1.weight"][:, perm]
    for suffix in ("weight", "bias"):
        key = f"final_layer.adaLN_modulation.1.{suffix}"
        out[key] = _rows(state[key], perm, 2)
    out["final_layer.linear.weight"] = state["final_layer.linear.weight"][:, perm]
    return out


def official_to_onestep(state: dict[str, torch.Tensor], arch: OfficialArch) -> dict[str, torch.Tensor]:
    """Validated official weights -> onestep DiT weights, same function on channels 0..C-1 (docstring)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "pos_embed" or key.startswith("projectors."):
            continue
        out[key.replace("x_embedder.proj.", "x_embedder.")] = value
    p, c, d = arch.patch_size, arch.in_channels, arch.hidden_size
    rows = state["final_layer.linear.weight"].reshape(p, p, arch.out_channels, d)
    out["final_layer.linear.weight"] = rows[:, :, :c].reshape(p * p * c, d)
    out["final_layer.linear.bias"] = state["final_layer.linear.bias"].reshape(p, p, -1)[:, :, :c].reshape(-1)
    out = permute_residual(out, residual_permutation(d))
    out["h_embedder.mlp.0.weight"] = state["t_embedder.mlp.0.weight"].clone()
    out["h_embedder.mlp.0.bias"] = state["t_embedder.mlp.0.bias"].clone()
    out["h_embedder.mlp.2.weight"] = torch.zeros_like(state["t_embedder.mlp.2.weight"])
    out["h_embedder.mlp.2.bias"] = torch.zeros_like(state["t_embedder.mlp.2.bias"])
    # Fresh tensors only: nothing aliases the file's (possibly memory-mapped) storage.
    originals = {id(v) for v in state.values()}
    return {k: v.clone() if id(v) in originals else v.contiguous() for k, v in out.items()}


def time_flip_matrix(frequency_size: int, max_period: float = 10000.0) -> torch.Tensor:
    """M (F, F) float64 with features(1 − t) = M · features(t), features = [cos(t·f) | sin(t·f)].

    cos((1−t)f) = cos f·cos(tf) + sin f·sin(tf);  sin((1−t)f) = sin f·cos(tf) − cos f·sin(tf).
    """
    half = frequency_size // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    cos, sin = torch.diag(torch.cos(freqs)), torch.diag(torch.sin(freqs))
    return torch.cat([torch.cat([cos, sin], dim=1), torch.cat([sin, -cos], dim=1)], dim=0)


def fold_time_flip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make the t embedding read 1 − t: t_embedder's first Linear W -> W·M (h_embedder untouched)."""
    out = dict(state)
    weight = state["t_embedder.mlp.0.weight"]
    out["t_embedder.mlp.0.weight"] = (weight.double() @ time_flip_matrix(weight.shape[1])).to(weight.dtype)
    return out


def negate_output(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Negate the network's output: final linear weight and bias times −1."""
    out = dict(state)
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        out[key] = -state[key]
    return out


def build_dit(arch: OfficialArch, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> DiT:
    """onestep DiT of the file's size with ``state`` loaded strictly, in ``dtype`` (default: the file's).

    Built on the meta device and filled by assignment (no random initialisation of ~675M weights):
    the parameters become the tensors of ``state`` (no two keys may share storage). The fixed
    position buffer is then computed exactly as ``DiT.__init__`` does.
    """
    dtype = dtype or state["x_embedder.weight"].dtype
    with torch.device("meta"):
        net = DiT(**arch.dit_kwargs())
    net.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    net.pos_embed = sincos_pos_embed_2d(arch.hidden_size, *net.grid_size).unsqueeze(0).to(dtype)
    return net
