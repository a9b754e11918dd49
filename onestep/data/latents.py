"""Precomputed VAE latents (e.g. ImageNet 256 -> SD-VAE 32x32x4) read from a local folder.

On-disk format (what ``tools/encode_latents.py`` writes): ``ROOT/*.npz`` shards, each with

- ``latents`` (N, C, H, W) float16 or float32 — the raw VAE posterior mean, *not* yet multiplied by
  the latent scale;
- ``labels`` (N,) int64;
- optionally ``latents_flip`` (N, C, H, W): the latents of the horizontally flipped images
  (``encode_latents.py --flip``); with ``flip: true`` (default) they are extra examples, so the
  set has 2N examples.

Other files in ROOT (``classes.json``, ``encode_latents.json``) are ignored. Latents stay in memory
in their stored dtype (fp16 halves the footprint) and ``get`` returns float32 multiplied by
``scale`` (SD-VAE: 0.18215), so the model sees roughly unit variance.

With ``vae`` (a Hugging Face id such as ``stabilityai/sd-vae-ft-mse`` or a local
``save_pretrained`` directory) the set can turn samples back into images:
``decode(x_scaled) -> images (N, 3, H·f, W·f)`` in [-1, 1]; ``decodes_to_images`` tells the
sampler and the evaluator. The VAE is loaded on first use only, so training never needs it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from onestep.data.base import TensorDataset
from onestep.registry import DATASETS, ConfigError

SD_VAE_SCALE = 0.18215
FLIP_KEY = "latents_flip"


def read_latent_shards(root: str | Path, limit: int | None = None, flip: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled latents (N, C, H, W) in their stored dtype and labels (N,) int64 from ROOT/*.npz.

    ``limit`` caps the number of shard rows (images) read; ``flip`` appends the shards'
    ``latents_flip`` rows (with the same labels) after them when the shards have that array."""
    root = Path(root).expanduser()
    shards = sorted(root.glob("*.npz")) if root.is_dir() else []
    if not shards:
        raise FileNotFoundError(f"no latent shards (*.npz with 'latents' and 'labels') under {root}; "
                                f"write them with tools/encode_latents.py")
    xs, xfs, ys, total = [], [], [], 0
    for shard in shards:
        with np.load(shard) as f:
            if "latents" not in f or "labels" not in f:
                raise ConfigError(f"{shard}: a latent shard needs arrays 'latents' and 'labels', has {list(f.keys())}")
            x = np.asarray(f["latents"])
            if x.dtype not in (np.float16, np.float32):
                x = x.astype(np.float32)
            xs.append(torch.from_numpy(x))
            ys.append(torch.from_numpy(np.asarray(f["labels"], dtype=np.int64)))
            if len(xs[-1]) != len(ys[-1]):
                raise ConfigError(f"{shard}: {len(xs[-1])} latents but {len(ys[-1])} labels")
            if FLIP_KEY in f:
                xfs.append(torch.from_numpy(np.asarray(f[FLIP_KEY], dtype=x.dtype)))
        total += xs[-1].shape[0]
        if limit is not None and total >= limit:
            break
    if len({tuple(x.shape[1:]) for x in xs}) > 1 or len({x.dtype for x in xs}) > 1:
        raise ConfigError(f"the shards under {root} mix latent shapes or dtypes "
                          f"({sorted({(tuple(x.shape[1:]), str(x.dtype)) for x in xs})})")
    x, y = torch.cat(xs), torch.cat(ys)
    if flip and xfs:
        if len(xfs) != len(xs):
            raise ConfigError(f"only {len(xfs)} of {len(xs)} shards under {root} have '{FLIP_KEY}'; "
                              f"re-encode them all with --flip, or set data.flip=false")
        xf = torch.cat(xfs)
        if xf.shape != x.shape:
            raise ConfigError(f"the shards under {root}: '{FLIP_KEY}' has shape {tuple(xf.shape)}, "
                              f"'latents' {tuple(x.shape)}")
    else:
        xf = None
    if limit is not None:
        x, y = x[:limit], y[:limit]
        xf = None if xf is None else xf[:limit]
    if xf is not None:
        x, y = torch.cat([x, xf]), torch.cat([y, y])
    return x, y


class LatentDataset(TensorDataset):
    """Latents held in memory unscaled (stored dtype); ``get`` returns ``scale``·x in float32."""

    def __init__(self, x: Tensor, y: Tensor | None, *, num_classes: int, scale: float, name: str = "latents",
                 vae: str | None = None, vae_batch_size: int = 32):
        super().__init__(x, y, num_classes=num_classes, kind="latent", name=name, keep_dtype=True)
        self.scale = float(scale)
        self.vae_name = vae
        self.vae_batch_size = vae_batch_size
        self._vae = None

    def get(self, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        x, y = super().get(indices)
        return x.float() * self.scale, y

    # -- images ------------------------------------------------------------------------------
    @property
    def decodes_to_images(self) -> bool:
        """True when a VAE is configured: samples can be decoded into images."""
        return self.vae_name is not None

    def vae(self, device=None):
        """The ``onestep.data.vae.VAE`` (loaded once, fp32), moved to ``device`` when given."""
        if self.vae_name is None:
            raise ConfigError("this latent dataset has no VAE; set data.vae (e.g. stabilityai/sd-vae-ft-mse "
                              "or a local AutoencoderKL directory) to decode latents into images")
        if self._vae is None:
            from onestep.data.vae import load_vae

            self._vae = load_vae(self.vae_name, device=device or "cpu", batch_size=self.vae_batch_size)
            if self._vae.latent_channels != self.shape[0]:
                raise ConfigError(f"VAE '{self.vae_name}' has {self._vae.latent_channels} latent channels, "
                                  f"the latents under data.root have {self.shape[0]}")
        return self._vae.to(device) if device is not None else self._vae

    def decode(self, x: Tensor) -> Tensor:
        """Samples in the model's coordinates (N, C, H, W), i.e. scaled latents -> images
        (N, 3, H·f, W·f) float32 in [-1, 1] on x's device (decoded there in chunks)."""
        return self.vae(x.device).decode(x.float() / self.scale)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one decoded image (loads the VAE)."""
        f = self.vae().downsample
        return (3, self.shape[1] * f, self.shape[2] * f)

    def describe_decoder(self) -> str:
        return f"latents decoded by VAE {self.vae_name} (scale {self.scale:g})"


@DATASETS.register("latents")
def latents(root: str, num_classes: int = 1000, scale: float = SD_VAE_SCALE, limit: int | None = None,
            conditional: bool = True, flip: bool = True, vae: str | None = None,
            vae_batch_size: int = 32) -> LatentDataset:
    """Precomputed VAE latents from ROOT/*.npz shards (latents, labels[, latents_flip]), scaled by ``scale``.

    ``flip``: use the shards' flipped-image latents as extra examples. ``limit``: read at most this
    many images. ``vae``: hub id or local directory of the AutoencoderKL that decodes samples
    into images (sampling, FID); loaded lazily, decoding in chunks of ``vae_batch_size``."""
    if vae_batch_size < 1:
        raise ConfigError(f"dataset 'latents': key 'vae_batch_size' must be >= 1, got {vae_batch_size}")
    x, y = read_latent_shards(root, limit, flip=flip)
    if conditional and y.numel() and int(y.max()) >= num_classes:
        raise ConfigError(f"data.num_classes={num_classes} but the shards under {root} hold label {int(y.max())}")
    return LatentDataset(x, y if conditional else None, num_classes=num_classes if conditional else 0,
                         scale=scale, name="latents", vae=vae, vae_batch_size=vae_batch_size)
