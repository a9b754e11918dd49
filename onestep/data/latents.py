"""Precomputed VAE latents (e.g. ImageNet 256 -> SD-VAE 32x32x4) read from a local folder.

On-disk format: ``ROOT/*.npz`` shards, each with ``latents`` (N, C, H, W) float16/float32 — the raw
VAE posterior mean, *not* yet multiplied by the latent scale — and ``labels`` (N,) int64.
The dataset multiplies by ``scale`` (SD-VAE: 0.18215) so the model sees roughly unit variance.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from onestep.data.base import TensorDataset
from onestep.registry import DATASETS, ConfigError

SD_VAE_SCALE = 0.18215


def read_latent_shards(root: str | Path, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    root = Path(root).expanduser()
    shards = sorted(root.glob("*.npz")) if root.is_dir() else []
    if not shards:
        raise FileNotFoundError(f"no latent shards (*.npz with 'latents' and 'labels') under {root}; "
                                f"write them with tools/encode_latents.py")
    xs, ys, total = [], [], 0
    for shard in shards:
        with np.load(shard) as f:
            if "latents" not in f or "labels" not in f:
                raise ConfigError(f"{shard}: a latent shard needs arrays 'latents' and 'labels', has {list(f.keys())}")
            xs.append(torch.from_numpy(np.asarray(f["latents"], dtype=np.float32)))
            ys.append(torch.from_numpy(np.asarray(f["labels"], dtype=np.int64)))
        total += xs[-1].shape[0]
        if limit is not None and total >= limit:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


@DATASETS.register("latents")
def latents(root: str, num_classes: int = 1000, scale: float = SD_VAE_SCALE, limit: int | None = None,
            conditional: bool = True) -> TensorDataset:
    """Precomputed VAE latents from ROOT/*.npz shards (latents, labels), scaled by ``scale``."""
    x, y = read_latent_shards(root, limit)
    if conditional and y.numel() and int(y.max()) >= num_classes:
        raise ConfigError(f"data.num_classes={num_classes} but the shards under {root} hold label {int(y.max())}")
    return TensorDataset(x * scale, y if conditional else None, num_classes=num_classes if conditional else 0,
                         kind="latent", name="latents")
