"""Tiny Fashion-MNIST files in torchvision's IDX layout whose classes a classifier can tell apart
(class k: a bright bar at rows 2k..2k+3 over noise), so the reference-classifier path trains in
seconds and passes its accuracy check."""

from __future__ import annotations

import struct

import numpy as np


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fashion(root, n_train: int = 1500, n_test: int = 200, seed: int = 0):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k + 4 : 2 * k + 8, 4:24] = 230
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root
