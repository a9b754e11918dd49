"""Images the way torch-fidelity reads them: uint8 (N, 3, H, W)."""

from __future__ import annotations

import torch
from torch import Tensor


def to_uint8_rgb(x: Tensor) -> Tensor:
    """(N, C, H, W) uint8, or float in [-1, 1], with C in {1, 3} -> uint8 (N, 3, H, W), same device."""
    x = torch.as_tensor(x).detach()
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


class ImageTensorDataset(torch.utils.data.Dataset):
    """uint8 (N, 3, H, W) images as the Dataset torch-fidelity reads (one tensor per item)."""

    def __init__(self, images: Tensor):
        self.images = to_uint8_rgb(images).cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


class EmptyDataset(torch.utils.data.Dataset):
    """Stands in for a reference whose statistics are already in torch-fidelity's cache."""

    def __len__(self):
        return 0

    def __getitem__(self, i):  # pragma: no cover - never read on a cache hit
        raise IndexError(i)
