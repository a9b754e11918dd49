"""Finite image sets that ship with the dependencies (no downloads).

``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 grayscale images, 10 classes),
held in memory as a ``TensorDataset`` with x (N, 1, S, S) in [-1, 1] and y (N,) int64.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..registry import DATASETS, ConfigError
from .base import TensorDataset

DIGITS_SPLITS = ("all", "train", "test")
# Every 5th image (index % 5 == 4) is in the test split: a fixed 80/20 split that needs no RNG and
# stays class-balanced because the sklearn file cycles through the classes.
DIGITS_TEST_EVERY = 5


def digits_split_indices(split: str, n: int = 1797) -> torch.Tensor:
    """Indices (int64) of ``split`` ("all", "train": ~80%, "test": the other ~20%) of n images."""
    index = torch.arange(n)
    if split == "all":
        return index
    is_test = index % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    if split == "test":
        return index[is_test]
    if split == "train":
        return index[~is_test]
    raise ConfigError(f"dataset 'digits': key 'split' must be one of {', '.join(DIGITS_SPLITS)}, got {split!r}")


def _load_digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """(x (1797, 1, 8, 8) float32 in [-1, 1], y (1797,) int64) from scikit-learn's bundled file."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a declared dependency
        raise ConfigError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # 0..16
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return x / 8.0 - 1.0, y


@DATASETS.register("digits", tags=("image",))
def digits(
    conditional: bool = True,
    split: Literal["all", "train", "test"] = "all",
    image_size: int = 8,
) -> TensorDataset:
    """scikit-learn's 8x8 digits as (N, 1, image_size, image_size) images in [-1, 1].

    ``conditional=False`` drops the labels (num_classes 0, y None). ``split`` selects the fixed
    80/20 split ("train", "test") or everything ("all"). ``image_size`` > 8 upsamples bilinearly
    (e.g. 16 or 32 for backbones that need larger inputs).
    """
    if split not in DIGITS_SPLITS:
        raise ConfigError(f"dataset 'digits': key 'split' must be one of {', '.join(DIGITS_SPLITS)}, got {split!r}")
    if image_size < 8:
        raise ConfigError(f"dataset 'digits': key 'image_size' must be >= 8 (the native size), got {image_size}")
    x, y = _load_digits_arrays()
    keep = digits_split_indices(split, len(x))
    x, y = x[keep], y[keep]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x = x.clamp(-1.0, 1.0)
    name = "digits" if split == "all" else f"digits_{split}"
    if conditional:
        return TensorDataset(x, y, num_classes=10, kind="image", name=name)
    return TensorDataset(x, None, num_classes=0, kind="image", name=name)
