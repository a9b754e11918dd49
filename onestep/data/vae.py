"""The image <-> latent autoencoder: diffusers' ``AutoencoderKL`` (SD-VAE) behind a small wrapper.

``load_vae(name_or_path, device=, dtype=) -> VAE`` loads ``AutoencoderKL.from_pretrained`` from a
Hugging Face id (default ``stabilityai/sd-vae-ft-mse``, read from the local Hugging Face cache
without touching the network when it is there, downloaded only when it is missing and the hub is
not offline) or from a local directory written by ``save_pretrained`` (``config.json`` + weights).
diffusers is the optional extra
``pip install 'onestep[vae]'``; without it, or without the weights, loading is a one-line
``ConfigError``.

``VAE.encode(images (N, 3, H, W) in [-1, 1]) -> (N, C, H/f, W/f)`` posterior mean (or a posterior
sample), **unscaled**: multiply by the latent scale (SD-VAE 0.18215) to get the model's
coordinates. ``VAE.decode(latents unscaled) -> images (N, 3, H, W)`` in [-1, 1] (clamped). Both run
in chunks of ``batch_size`` on the wrapper's device/dtype and return float32 on the input's device.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from onestep.registry import ConfigError

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
INSTALL_HINT = "pip install 'onestep[vae]'"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autoencoder_class():
    """diffusers' ``AutoencoderKL`` class, or a one-line ``ConfigError`` saying how to install it."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise ConfigError(f"the SD-VAE needs diffusers ({exc}); install it with: {INSTALL_HINT}") from None
    return AutoencoderKL


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``owner/name``)."""
    return (
        os.path.exists(os.path.expanduser(name))
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def hub_snapshot(repo_id: str, cache_dir: str | None = None) -> Path:
    """The local folder of hub model ``repo_id``: from the Hugging Face cache when it is there (no
    network at all), else downloaded (config.json and safetensors weights) unless the hub is offline."""
    from huggingface_hub import snapshot_download

    hint = (
        f"run `huggingface-cli download {repo_id}` where there is network (it fills the cache), "
        f"or pass a local directory"
    )
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except Exception as local_exc:
        if _hub_offline():
            raise ConfigError(
                f"VAE '{repo_id}': not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading; {hint}"
            ) from None
        try:
            return Path(
                snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=["config.json", "*.safetensors"])
            )
        except Exception as exc:
            raise ConfigError(
                f"VAE '{repo_id}': not in the local Hugging Face cache ({type(local_exc).__name__}) "
                f"and the download failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                f"{hint}"
            ) from None


def load_autoencoder(name_or_path: str = DEFAULT_VAE, cache_dir: str | None = None):
    """``AutoencoderKL`` in eval mode, frozen, fp32 on the CPU, from a local directory or a hub id
    (``cache_dir``: the Hugging Face cache to use instead of the default)."""
    cls = autoencoder_class()
    path = Path(name_or_path).expanduser() if _looks_like_path(name_or_path) else hub_snapshot(name_or_path, cache_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"VAE '{name_or_path}': {path} is not a directory with config.json and weights "
            f"(write one with AutoencoderKL.save_pretrained, or give a Hugging Face id "
            f"such as {DEFAULT_VAE})"
        )
    try:
        model = cls.from_pretrained(str(path), low_cpu_mem_usage=False)
    except Exception as exc:
        raise ConfigError(
            f"VAE '{name_or_path}': cannot load {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from None
    return model.eval().requires_grad_(False)


class VAE:
    """Batched encode/decode around an ``AutoencoderKL`` on one device and dtype (see module doc)."""

    def __init__(
        self, model, *, name: str = "", device="cpu", dtype: torch.dtype = torch.float32, batch_size: int = 32
    ):
        if batch_size < 1:
            raise ConfigError(f"VAE batch_size must be >= 1, got {batch_size}")
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.model = model.to(self.device)
        if dtype != torch.float32:  # (diffusers warns on any dtype cast, even a no-op one)
            self.model.to(dtype)
        blocks = len(model.config.block_out_channels)
        self.downsample = 2 ** (blocks - 1)  # image side / latent side
        self.latent_channels = int(model.config.latent_channels)

    def to(self, device) -> "VAE":
        device = torch.device(device)
        if device != self.device:
            self.model.to(device)
            self.device = device
        return self

    @torch.no_grad()
    def encode(self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """images (N, 3, H, W) in [-1, 1] -> unscaled latents (N, C, H/f, W/f) float32: the posterior
        mean, or with ``sample=True`` a draw mean + std·e (e from ``generator`` on the VAE's device)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"VAE.encode wants images (N, 3, H, W), got shape {tuple(images.shape)}")
        out = []
        for chunk in images.split(self.batch_size):
            dist = self.model.encode(chunk.to(self.device, self.dtype)).latent_dist
            z = dist.sample(generator) if sample else dist.mean
            out.append(z.float().to(images.device))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Unscaled latents (N, C, h, w) -> images (N, 3, h·f, w·f) float32 in [-1, 1]."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"VAE.decode wants latents (N, {self.latent_channels}, h, w), got shape {tuple(latents.shape)}"
            )
        out = []
        for chunk in latents.split(self.batch_size):
            x = self.model.decode(chunk.to(self.device, self.dtype)).sample
            out.append(x.float().clamp(-1.0, 1.0).to(latents.device))
        return torch.cat(out)


def load_vae(
    name_or_path: str = DEFAULT_VAE,
    *,
    device="cpu",
    dtype: str | torch.dtype = "fp32",
    batch_size: int = 32,
    cache_dir: str | None = None,
) -> VAE:
    """Load the autoencoder (see ``load_autoencoder``) as a ``VAE`` on ``device`` in ``dtype``
    (fp32 | bf16 | fp16 or a torch dtype); encode/decode then run in chunks of ``batch_size``."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"VAE dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    return VAE(
        load_autoencoder(name_or_path, cache_dir),
        name=str(name_or_path),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )
