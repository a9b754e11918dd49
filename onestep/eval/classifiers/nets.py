"""The reference classifiers' networks and input preparation (see ``base``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DigitsCNN(nn.Module):
    """(B, 1, 8, 8) in [-1, 1] -> logits (B, 10); ``features`` gives the 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 2x2
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """(B, 1, 28, 28) in [-1, 1] -> logits (B, classes): two conv pairs (32, 64 channels) with 2x2
    max-pooling, a 128-d post-ReLU penultimate layer (``features``), dropout, a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128, dropout: float = 0.3):
        super().__init__()
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7x7
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 49, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def gray_images(x: Tensor, what: str, min_size: int) -> Tensor:
    """(N, C, S, S) float in [-1, 1], C in {1, 3} -> (N, 1, S, S) float32 on the CPU, clamped."""
    x = torch.as_tensor(x).detach()
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3] or x.shape[2] < min_size:
        raise ValueError(
            f"{what}: samples must be (N, 1, S, S) images with S >= {min_size}, got shape {tuple(x.shape)}"
        )
    x = x.float().cpu().clamp(-1.0, 1.0)
    return x.mean(1, keepdim=True) if x.shape[1] == 3 else x


def prepare_8px(x: Tensor, what: str = "digits") -> Tensor:
    """-> (N, 1, 8, 8): area resize (exact block means when 8 divides S)."""
    x = gray_images(x, what, 8)
    return F.interpolate(x, size=(8, 8), mode="area") if x.shape[2] != 8 else x


def prepare_28px(x: Tensor, what: str = "images") -> Tensor:
    """-> (N, 1, 28, 28): 28 as is, 32 center-cropped (undoes the datasets' 2-px pad), other sizes
    resized bilinearly."""
    x = gray_images(x, what, 8)
    size = x.shape[2]
    if size == 32:
        return x[:, :, 2:30, 2:30].contiguous()
    if size != 28:
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    return x


def shift_augment(x: Tensor, g: torch.Generator, max_shift: int = 1, flip: bool = False) -> Tensor:
    """Random translation by up to ``max_shift`` pixels (background -1 padding), and a random
    horizontal flip of half the images when ``flip``."""
    n, size, k = x.shape[0], x.shape[-1], 2 * max_shift + 1
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    shift = torch.randint(0, k * k, (n,), generator=g)
    out = torch.empty_like(x)
    for s in range(k * k):
        dy, dx = divmod(s, k)
        rows = shift == s
        out[rows] = padded[rows, :, dy : dy + size, dx : dx + size]
    if flip:
        mirror = torch.rand(n, generator=g) < 0.5
        out[mirror] = out[mirror].flip(-1)
    return out
