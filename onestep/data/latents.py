"""Precomputed VAE latents (e.g. ImageNet 256 -> SD-VAE 32x32x4) read from a local folder.

On-disk format (what ``tools/encode_latents.py`` writes): ``ROOT/*.npz`` shards, each with

- ``latents`` (N, C, H, W) float16 or float32 — the raw VAE posterior mean, *not* yet multiplied by
  the latent scale;
- ``labels`` (N,) int64;
- optionally ``latents_flip`` (N, C, H, W): the latents of the horizontally flipped images
  (``encode_latents.py --flip``); with ``flip: true`` (default) they are extra examples, so the
  set has 2N examples.

Other files in ROOT (``classes.json``, ``encode_latents.json``) are ignored. Latents are
memory-mapped from the shards (``mmap: true``, the default; the shards are uncompressed zips, so
each array is one contiguous run of bytes) or read into memory (``mmap: false``, or shards written
with ``np.savez_compressed``), in their stored dtype either way, and ``get`` returns float32 in the
model's coordinates, roughly unit variance, by one of two normalizations of the stored latents z:

- one scale (default; DiT, SiT, REPA, MeanFlow): x = scale·z, SD-VAE ``scale`` = 0.18215;
- per channel (``latent_mean``, ``latent_std``, one value per channel; Improved MeanFlow):
  x_c = (z_c − μ_c)/σ_c. iMF's published values for the sd-vae-ft-mse posterior mean on ImageNet 256
  (official code ``utils/vae_util.py``) are μ = [0.86488, −0.27788, 0.21617, 0.37384],
  σ = [4.85504, 5.31922, 3.93725, 3.98700]; they apply to the *unscaled* latents, which is what the
  shards hold.

Decoding inverts it exactly (z = x/scale, or z_c = σ_c·x_c + μ_c) before the VAE.

With ``vae`` (a Hugging Face id such as ``stabilityai/sd-vae-ft-mse`` or a local
``save_pretrained`` directory) the set can turn samples back into images:
``decode(x) -> images (N, 3, H·f, W·f)`` in [-1, 1] (x in the model's coordinates); ``decodes_to_images`` tells the
sampler and the evaluator. The VAE is loaded on first use only, so training never needs it.
"""

from __future__ import annotations

import contextlib
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from onestep.data.base import Dataset
from onestep.registry import DATASETS, ConfigError, DataNotFound

SD_VAE_SCALE = 0.18215
FLIP_KEY = "latents_flip"


@contextlib.contextmanager
def _open_shard(shard: Path):
    """np.load of a shard (no pickles); a truncated or corrupt file is one ConfigError line naming it."""
    try:
        f = np.load(shard, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ConfigError(
            f"{shard}: not a readable .npz shard ({type(exc).__name__}: {exc}); "
            f"re-encode it with tools/encode_latents.py"
        ) from None
    try:
        yield f
    except ConfigError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise ConfigError(
            f"{shard}: corrupt .npz shard ({type(exc).__name__}: {exc}); re-encode it with tools/encode_latents.py"
        ) from None
    finally:
        f.close()


def npz_member_memmap(path: str | Path, key: str) -> np.memmap | None:
    """A read-only ``np.memmap`` of array ``key`` inside the .npz at ``path``, or None when that
    member is compressed (``np.savez_compressed``) and so cannot be mapped.

    An uncompressed .npz is a zip whose members are stored .npy files: the array's bytes lie
    contiguously after the member's local zip header and its .npy header."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ConfigError(f"{path}: member '{key}.npy' has no zip local header at its offset (corrupt shard?)")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(
            version
        )
        if read_header is None:
            return None
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
    if dtype.hasobject:
        raise ConfigError(f"{path}: array '{key}' holds Python objects; latents must be float16/float32")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")


class ShardRows:
    """Rows of several (N_i, *shape) arrays — memory maps or in-memory arrays — read as one
    (sum N_i, *shape) array: ``take(indices)`` gathers rows from whichever shard holds them."""

    def __init__(self, parts: list[np.ndarray]):
        if not parts:
            raise ValueError("ShardRows needs at least one array")
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts])
        self.starts = self.ends - np.array([len(p) for p in parts])
        self.row_shape = tuple(parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.ends[-1])

    @property
    def mapped(self) -> bool:
        """True when every part is a memory map (rows are read from disk / the page cache)."""
        return all(isinstance(p, np.memmap) for p in self.parts)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows at ``indices`` (any order, repeats allowed) as a new (len(indices), *shape) array."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((indices.size, *self.row_shape), dtype=self.dtype)
        shard = np.searchsorted(self.ends, indices, side="right")
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            local = indices[where] - self.starts[s]
            order = np.argsort(local, kind="stable")  # read each shard front to back
            out[where[order]] = self.parts[s][local[order]]
        return out


def read_latent_shards(
    root: str | Path, limit: int | None = None, flip: bool = False, mmap: bool = True
) -> tuple[ShardRows, torch.Tensor]:
    """Unscaled latents as ``ShardRows`` (N rows of (C, H, W), stored dtype) and labels (N,) int64
    from ROOT/*.npz.

    ``mmap``: map uncompressed shards' latents instead of reading them into memory (compressed
    shards are always read). ``limit`` caps the number of shard rows (images) read; ``flip``
    appends the shards' ``latents_flip`` rows (with the same labels) after them when the shards
    have that array."""
    root = Path(root).expanduser()
    shards = sorted(root.glob("*.npz")) if root.is_dir() else []
    if not shards:
        raise DataNotFound(
            f"no latent shards (*.npz with 'latents' and 'labels') under {root}; "
            f"write them with tools/encode_latents.py"
        )

    def load(shard: Path, f, key: str) -> np.ndarray:
        x = npz_member_memmap(shard, key) if mmap else None
        x = np.asarray(f[key]) if x is None else x
        return x if x.dtype in (np.float16, np.float32) else np.asarray(x, dtype=np.float32)

    xs, xfs, ys, total = [], [], [], 0
    for shard in shards:
        with _open_shard(shard) as f:
            if "latents" not in f or "labels" not in f:
                raise ConfigError(f"{shard}: a latent shard needs arrays 'latents' and 'labels', has {list(f.keys())}")
            xs.append(load(shard, f, "latents"))
            ys.append(np.asarray(f["labels"], dtype=np.int64))
            if len(xs[-1]) != len(ys[-1]):
                raise ConfigError(f"{shard}: {len(xs[-1])} latents but {len(ys[-1])} labels")
            if flip and FLIP_KEY in f:
                xfs.append(load(shard, f, FLIP_KEY))
                if xfs[-1].shape != xs[-1].shape:
                    raise ConfigError(
                        f"{shard}: '{FLIP_KEY}' has shape {tuple(xfs[-1].shape)}, 'latents' {tuple(xs[-1].shape)}"
                    )
        total += len(xs[-1])
        if limit is not None and total >= limit:
            break
    kinds = {(tuple(x.shape[1:]), str(x.dtype)) for x in xs + xfs}
    if len(kinds) > 1:
        raise ConfigError(f"the shards under {root} mix latent shapes or dtypes ({sorted(kinds)})")
    if flip and xfs and len(xfs) != len(xs):
        raise ConfigError(
            f"only {len(xfs)} of {len(xs)} shards under {root} have '{FLIP_KEY}'; "
            f"re-encode them all with --flip, or set data.flip=false"
        )
    if limit is not None and total > limit:  # trim the last shard read
        keep = len(xs[-1]) - (total - limit)
        xs[-1], ys[-1] = xs[-1][:keep], ys[-1][:keep]
        if xfs:
            xfs[-1] = xfs[-1][:keep]
    y = torch.from_numpy(np.concatenate(ys))
    if xfs:
        return ShardRows(xs + xfs), torch.cat([y, y])
    return ShardRows(xs), y


IMF_LATENT_MEAN = [0.86488, -0.27788, 0.21617, 0.37384]
IMF_LATENT_STD = [4.85504, 5.31922, 3.93725, 3.98700]


class LatentDataset(Dataset):
    """Latents kept unscaled in their stored dtype — memory-mapped from the shards by default, so
    the ranks of a node share one copy in the page cache — and ``get`` returns float32 normalized
    latents: ``scale``·z, or (z − mean)/std per channel when ``mean`` and ``std`` are given."""

    def __init__(
        self,
        rows: ShardRows,
        y: Tensor | None,
        *,
        num_classes: int,
        scale: float = SD_VAE_SCALE,
        name: str = "latents",
        vae: str | None = None,
        vae_batch_size: int = 32,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ):
        if y is not None and len(y) != len(rows):
            raise ValueError(f"{len(rows)} latents but {len(y)} labels")
        if (mean is None) != (std is None):
            raise ValueError("latent_mean and latent_std go together (one value per channel each)")
        channels = rows.row_shape[0]
        if mean is not None and (len(mean) != channels or len(std) != channels):
            raise ValueError(
                f"latent_mean and latent_std need one value per channel ({channels}), got {len(mean)} and {len(std)}"
            )
        if std is not None and not all(s > 0 for s in std):
            raise ValueError(f"latent_std values must be > 0, got {list(std)}")
        self.rows = rows
        self.y = None if y is None else y.long()
        self.shape = rows.row_shape
        self.num_classes = num_classes
        self.kind = "latent"
        self.name = name
        self.scale = float(scale)
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(v) for v in std]
        self.vae_name = vae
        self.vae_batch_size = vae_batch_size
        self._vae = None

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype of the latents (float16 or float32)."""
        return torch.from_numpy(np.empty(0, dtype=self.rows.dtype)).dtype

    def get(self, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        index = torch.as_tensor(indices).reshape(-1).cpu()
        x = torch.from_numpy(self.rows.take(index.numpy()))
        return self.normalize(x.float()), (None if self.y is None else self.y[index])

    def _channel(self, values: list[float], x: Tensor) -> Tensor:
        return torch.tensor(values, dtype=x.dtype, device=x.device).reshape(1, -1, *([1] * (x.ndim - 2)))

    def normalize(self, z: Tensor) -> Tensor:
        """Stored (unscaled) latents (N, C, H, W) -> the model's coordinates: scale·z or (z − μ)/σ."""
        if self.mean is None:
            return z * self.scale
        return (z - self._channel(self.mean, z)) / self._channel(self.std, z)

    def denormalize(self, x: Tensor) -> Tensor:
        """The inverse of ``normalize``: the model's coordinates -> unscaled latents for the VAE."""
        if self.mean is None:
            return x / self.scale
        return x * self._channel(self.std, x) + self._channel(self.mean, x)

    # -- images ------------------------------------------------------------------------------
    @property
    def decodes_to_images(self) -> bool:
        """True when a VAE is configured: samples can be decoded into images."""
        return self.vae_name is not None

    def vae(self, device=None):
        """The ``onestep.data.vae.VAE`` (loaded once, fp32), moved to ``device`` when given."""
        if self.vae_name is None:
            raise ConfigError(
                "this latent dataset has no VAE; set data.vae (e.g. stabilityai/sd-vae-ft-mse "
                "or a local AutoencoderKL directory) to decode latents into images"
            )
        if self._vae is None:
            from onestep.data.vae import load_vae

            self._vae = load_vae(self.vae_name, device=device or "cpu", batch_size=self.vae_batch_size)
            if self._vae.latent_channels != self.shape[0]:
                raise ConfigError(
                    f"VAE '{self.vae_name}' has {self._vae.latent_channels} latent channels, "
                    f"the latents under data.root have {self.shape[0]}"
                )
        return self._vae.to(device) if device is not None else self._vae

    def decode(self, x: Tensor) -> Tensor:
        """Samples in the model's coordinates (N, C, H, W), i.e. normalized latents -> images
        (N, 3, H·f, W·f) float32 in [-1, 1] on x's device (decoded there in chunks)."""
        return self.vae(x.device).decode(self.denormalize(x.float()))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one decoded image (loads the VAE)."""
        f = self.vae().downsample
        return (3, self.shape[1] * f, self.shape[2] * f)

    def describe_decoder(self) -> str:
        if self.mean is not None:
            return f"latents decoded by VAE {self.vae_name} (per-channel mean {self.mean}, std {self.std})"
        return f"latents decoded by VAE {self.vae_name} (scale {self.scale:g})"


@DATASETS.register("latents")
def latents(
    root: str,
    num_classes: int = 1000,
    scale: float | None = None,
    limit: int | None = None,
    conditional: bool = True,
    flip: bool = True,
    vae: str | None = None,
    vae_batch_size: int = 32,
    mmap: bool = True,
    latent_mean: list[float] | None = None,
    latent_std: list[float] | None = None,
) -> LatentDataset:
    """Precomputed VAE latents from ROOT/*.npz shards (latents, labels[, latents_flip]), scaled by ``scale``.

    ``scale`` (default 0.18215, SD-VAE): x = scale·z. ``latent_mean``, ``latent_std`` (one value per
    channel, instead of ``scale``): x = (z − mean)/std per channel, as Improved MeanFlow normalizes.

    ``flip``: use the shards' flipped-image latents as extra examples. ``limit``: read at most this
    many images. ``mmap``: memory-map the (uncompressed) shards instead of reading them into each
    process's memory; ImageNet-256 with flips is ~21 GB of fp16 latents, which torchrun's ranks then
    share through the page cache rather than each holding a copy. ``vae``: hub id or local directory of the
    AutoencoderKL that decodes samples
    into images (sampling, FID); loaded lazily, decoding in chunks of ``vae_batch_size``."""
    if vae_batch_size < 1:
        raise ConfigError(f"dataset 'latents': key 'vae_batch_size' must be >= 1, got {vae_batch_size}")
    if scale is not None and latent_mean is not None:
        raise ConfigError("dataset 'latents': give either scale or latent_mean/latent_std, not both")
    if (latent_mean is None) != (latent_std is None):
        raise ConfigError("dataset 'latents': latent_mean and latent_std go together (one value per channel each)")
    if latent_std is not None and not all(v > 0 for v in latent_std):
        raise ConfigError(f"dataset 'latents': latent_std values must be > 0, got {latent_std}")
    if scale is not None and not scale > 0:
        raise ConfigError(f"dataset 'latents': scale must be > 0, got {scale}")
    x, y = read_latent_shards(root, limit, flip=flip, mmap=mmap)
    if conditional and y.numel() and int(y.max()) >= num_classes:
        raise ConfigError(f"data.num_classes={num_classes} but the shards under {root} hold label {int(y.max())}")
    try:
        return LatentDataset(
            x,
            y if conditional else None,
            num_classes=num_classes if conditional else 0,
            scale=SD_VAE_SCALE if scale is None else scale,
            name="latents",
            vae=vae,
            vae_batch_size=vae_batch_size,
            mean=latent_mean,
            std=latent_std,
        )
    except ValueError as exc:
        raise ConfigError(
            f"dataset 'latents': {exc} (the shards under {root} have {x.row_shape[0]} channels)"
        ) from None
