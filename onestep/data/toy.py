"""Two-dimensional toy distributions, generated on the fly.

Every set here is a ``ToyDataset``: ``size is None``, ``kind = "vector"``, ``num_classes = 0`` and
``generate(n, generator) -> (x float32 (n, D), None)``. Samples use only the given CPU
``torch.Generator``, so the same seed gives the same points on every run and machine. All sets live
roughly in [-4, 4]^2 so one plotting window and one backbone scale fit them all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..registry import DATASETS, ConfigError
from .base import Dataset


class ToyDataset(Dataset):
    """A distribution sampled on demand; subclasses implement ``_sample(n, generator)``."""

    kind = "vector"
    num_classes = 0

    def __init__(self, name: str, dim: int = 2):
        self.name = name
        self.shape = (dim,)

    def _sample(self, n: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def generate(self, n: int, generator: torch.Generator) -> tuple[Tensor, None]:
        """Draw ``n`` samples: ``(x (n, D) float32, None)``."""
        if n < 0:
            raise ValueError(f"{self.name}: number of samples must be >= 0, got {n}")
        x = self._sample(int(n), generator).to(torch.float32).contiguous()
        return x, None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, shape={self.shape})"


def _positive(where: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ConfigError(f"dataset '{where}': key '{key}' must be > 0, got {value!r}")


def _non_negative(where: str, **values: float) -> None:
    for key, value in values.items():
        if not value >= 0:
            raise ConfigError(f"dataset '{where}': key '{key}' must be >= 0, got {value!r}")


# --------------------------------------------------------------------------------------- checkerboard

# Cell indices (i, j) = (floor(x/2), floor(y/2)) of the 4x4 board on [-4, 4]^2 with i + j even.
CHECKERBOARD_DARK_CELLS = tuple((i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0)


class Checkerboard(ToyDataset):
    """Uniform on the 8 dark cells of a 4x4 board covering [-4, 4]^2 (cell side 2); the cell
    containing (x, y) is dark when floor(x/2) + floor(y/2) is even."""

    def __init__(self):
        super().__init__("checkerboard")
        self.cells = torch.tensor(CHECKERBOARD_DARK_CELLS, dtype=torch.float64)  # (8, 2)

    def _sample(self, n, generator):
        cell = torch.randint(len(self.cells), (n,), generator=generator)
        low = 2.0 * self.cells[cell]
        x = low + 2.0 * torch.rand(n, 2, generator=generator, dtype=torch.float64)
        # Keep float32 rounding from pushing a point onto the next (light) cell's edge.
        high = (low + 2.0).float()
        x = x.float()
        return torch.minimum(x, torch.nextafter(high, torch.full_like(high, -math.inf)))


@DATASETS.register("checkerboard", tags=("toy",))
def checkerboard() -> Checkerboard:
    """8 uniform dark cells of a 4x4 checkerboard on [-4, 4]^2."""
    return Checkerboard()


# ------------------------------------------------------------------------------------ eight_gaussians


class EightGaussians(ToyDataset):
    """Equal-weight mixture of N(c_k, std^2 I), c_k = radius * (cos 2pi k/8, sin 2pi k/8), k = 0..7."""

    def __init__(self, radius: float = 4.0, std: float = 0.5):
        super().__init__("eight_gaussians")
        angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
        self.centers = radius * torch.stack([angles.cos(), angles.sin()], dim=1)  # (8, 2)
        self.std = std

    def _sample(self, n, generator):
        k = torch.randint(8, (n,), generator=generator)
        e = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self.centers[k] + self.std * e


@DATASETS.register("eight_gaussians", tags=("toy",))
def eight_gaussians(radius: float = 4.0, std: float = 0.5) -> EightGaussians:
    """Eight Gaussians on a circle of ``radius``, ``std`` per axis."""
    _positive("eight_gaussians", radius=radius, std=std)
    return EightGaussians(float(radius), float(std))


# ------------------------------------------------------------------------------------------ two_moons


class TwoMoons(ToyDataset):
    """Two interleaved half circles (the scikit-learn "moons"), centered and scaled.

    Upper moon (cos s, sin s), lower moon (1 - cos s, 0.5 - sin s), s ~ U[0, pi]; shifted by
    (-0.5, -0.25), multiplied by ``scale`` (x spans about [-1.5, 1.5] * scale), then isotropic
    Gaussian noise of std ``noise * scale``.
    """

    def __init__(self, scale: float = 2.5, noise: float = 0.1):
        super().__init__("two_moons")
        self.scale, self.noise = scale, noise

    def _sample(self, n, generator):
        upper = torch.rand(n, generator=generator) < 0.5
        s = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        x = torch.where(upper, s.cos(), 1 - s.cos())
        y = torch.where(upper, s.sin(), 0.5 - s.sin())
        points = torch.stack([x - 0.5, y - 0.25], dim=1)
        e = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self.scale * (points + self.noise * e)


@DATASETS.register("two_moons", tags=("toy",))
def two_moons(scale: float = 2.5, noise: float = 0.1) -> TwoMoons:
    """Two interleaved moons, about [-3.75, 3.75] x [-1.9, 1.9] at the default ``scale``."""
    _positive("two_moons", scale=scale)
    _non_negative("two_moons", noise=noise)
    return TwoMoons(float(scale), float(noise))


# -------------------------------------------------------------------------------------------- spirals


class Spirals(ToyDataset):
    """Two interleaved spiral arms (point reflections of each other).

    s = turns * 2pi * sqrt(u), u ~ U[0, 1] (about uniform along the arm); arm sign a = +-1;
    x = a * scale * s / (turns * 2pi) * (-cos s, sin s) + noise * e, so the arms end at radius
    ``scale``.
    """

    def __init__(self, scale: float = 3.5, noise: float = 0.1, turns: float = 1.5):
        super().__init__("spirals")
        self.scale, self.noise, self.turns = scale, noise, turns

    def _sample(self, n, generator):
        arm = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, -1.0).double()
        s_max = self.turns * 2 * math.pi
        s = s_max * torch.rand(n, generator=generator, dtype=torch.float64).sqrt()
        radius = arm * self.scale * s / s_max
        points = torch.stack([-radius * s.cos(), radius * s.sin()], dim=1)
        e = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return points + self.noise * e


@DATASETS.register("spirals", tags=("toy",))
def spirals(scale: float = 3.5, noise: float = 0.1, turns: float = 1.5) -> Spirals:
    """Two spiral arms of ``turns`` turns each, ending at radius ``scale``."""
    _positive("spirals", scale=scale, turns=turns)
    _non_negative("spirals", noise=noise)
    return Spirals(float(scale), float(noise), float(turns))


# ---------------------------------------------------------------------------------------------- rings


class Rings(ToyDataset):
    """Concentric circles of radii scale * k / num_rings, k = 1..num_rings, with ring k picked with
    probability proportional to its radius (uniform along the total length), angle ~ U[0, 2pi),
    plus Gaussian noise of std ``noise``."""

    def __init__(self, num_rings: int = 3, scale: float = 3.5, noise: float = 0.08):
        super().__init__("rings")
        self.radii = scale * torch.arange(1, num_rings + 1, dtype=torch.float64) / num_rings
        self.noise = noise

    def _sample(self, n, generator):
        ring = (
            torch.multinomial(self.radii / self.radii.sum(), n, replacement=True, generator=generator)
            if n > 0
            else torch.zeros(0, dtype=torch.long)
        )
        angle = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        r = self.radii[ring]
        points = torch.stack([r * angle.cos(), r * angle.sin()], dim=1)
        e = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return points + self.noise * e


@DATASETS.register("rings", tags=("toy",))
def rings(num_rings: int = 3, scale: float = 3.5, noise: float = 0.08) -> Rings:
    """``num_rings`` concentric circles, the outermost of radius ``scale``."""
    if num_rings < 1:
        raise ConfigError(f"dataset 'rings': key 'num_rings' must be >= 1, got {num_rings!r}")
    _positive("rings", scale=scale)
    _non_negative("rings", noise=noise)
    return Rings(int(num_rings), float(scale), float(noise))


# ------------------------------------------------------------------------------------------- gaussian


class Gaussian(ToyDataset):
    """N(mean, std^2 I) in ``dim`` dimensions; ``mean`` is a scalar (all coordinates) or a list."""

    def __init__(self, dim: int, mean: Tensor, std: float):
        super().__init__("gaussian", dim)
        self.mean, self.std = mean, std

    def _sample(self, n, generator):
        e = torch.randn(n, self.shape[0], generator=generator, dtype=torch.float64)
        return self.mean + self.std * e


@DATASETS.register("gaussian", tags=("toy",))
def gaussian(dim: int = 2, mean: float | list[float] = 0.0, std: float = 1.0) -> Gaussian:
    """An isotropic Gaussian N(mean, std^2 I) in ``dim`` dimensions (closed-form tests)."""
    if dim < 1:
        raise ConfigError(f"dataset 'gaussian': key 'dim' must be >= 1, got {dim!r}")
    _positive("gaussian", std=std)
    if isinstance(mean, (list, tuple)):
        if len(mean) != dim:
            raise ConfigError(f"dataset 'gaussian': key 'mean' has {len(mean)} entries, expected dim={dim}")
        mu = torch.tensor([float(m) for m in mean], dtype=torch.float64)
    else:
        mu = torch.full((dim,), float(mean), dtype=torch.float64)
    return Gaussian(int(dim), mu, float(std))
