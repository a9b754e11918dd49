"""What a model knows about its data when the data itself is not there.

Sampling needs only the sample shape, the class count and (for latents) the scale and a VAE to
decode with; a public checkpoint has no training data at all, and an exported model or a run moved
to another machine usually does not have its data next to it. ``ModelData`` / ``ModelLatents``
stand in for the dataset then: same ``shape``, ``num_classes``, ``kind``, ``name`` and, for latents,
``decode`` through a VAE (``data.vae`` or ``--vae``), but no examples (``size`` is None and asking
for data, e.g. a metric's reference, is one ConfigError line saying why there is none).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.base import Dataset
from ..data.latents import SD_VAE_SCALE, LatentDataset
from ..registry import ConfigError

__all__ = ["ModelData", "ModelLatents", "stand_in_data", "set_vae"]


def _no_data(name: str, reason: str) -> ConfigError:
    return ConfigError(
        f"the data of this model ('{name}') is not available ({reason}); metrics that compare "
        f"against data need --reference, or the data itself"
    )


class ModelData(Dataset):
    """Shape, classes and kind of a model's data, without any examples (module docstring)."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, *, kind: str, name: str, reason: str):
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.kind = kind
        self.name = name
        self.reason = reason

    def get(self, indices: Tensor):
        raise _no_data(self.name, self.reason)

    def generate(self, n: int, generator: torch.Generator):
        raise _no_data(self.name, self.reason)


class ModelLatents(LatentDataset):
    """Latent data without examples: ``decode`` works when a VAE is named (module docstring)."""

    def __init__(
        self,
        shape: tuple[int, ...],
        num_classes: int,
        *,
        scale: float = SD_VAE_SCALE,
        vae: str | None = None,
        name: str = "latents",
        reason: str = "no data",
        vae_batch_size: int = 32,
    ):
        self.rows = None
        self.y = None
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.kind = "latent"
        self.name = name
        self.scale = float(scale)
        self.vae_name = vae
        self.vae_batch_size = int(vae_batch_size)
        self._vae = None
        self.reason = reason

    @property
    def size(self) -> None:
        return None

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def get(self, indices: Tensor):
        raise _no_data(self.name, self.reason)

    def generate(self, n: int, generator: torch.Generator):
        raise _no_data(self.name, self.reason)


def stand_in_data(shape, num_classes: int, *, data: dict, reason: str) -> Dataset:
    """The stand-in for a recipe's ``data`` section: latents (``name: latents``) keep their scale and
    VAE; other data with three dimensions is image data, else vector data."""
    name = str(data.get("name", "data"))
    if name == "latents":
        return ModelLatents(
            shape,
            num_classes,
            scale=float(data.get("scale", SD_VAE_SCALE)),
            vae=data.get("vae"),
            name=name,
            reason=reason,
            vae_batch_size=int(data.get("vae_batch_size", 32)),
        )
    return ModelData(shape, num_classes, kind="image" if len(tuple(shape)) == 3 else "vector", name=name, reason=reason)


def set_vae(dataset: Dataset, vae: str | None) -> Dataset:
    """Decode ``dataset``'s latent samples with the VAE ``vae`` (a Hugging Face id or a local
    AutoencoderKL directory); None leaves it as it is. Non-latent data refuses a VAE."""
    if vae is None:
        return dataset
    if not isinstance(dataset, LatentDataset):
        raise ConfigError(f"--vae: this model's data '{dataset.name}' is {dataset.kind} data, not latents")
    dataset.vae_name, dataset._vae = str(vae), None
    return dataset
