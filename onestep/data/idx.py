"""IDX files (LeCun's MNIST format) and the two image sets stored in it: ``mnist`` and ``fashion_mnist``.

An IDX file is a 4-byte magic ``0, 0, type, ndim`` (type 0x08 = uint8, 0x09 int8, 0x0B int16,
0x0C int32, 0x0D float32, 0x0E float64), ``ndim`` big-endian uint32 sizes, then the values
row-major, big-endian. ``read_idx`` reads plain or gzip-compressed (``.gz``) files and checks every
part; a missing, truncated or foreign file is one ``ConfigError`` line naming the file, what was
expected and the layout.

Both sets use torchvision's layout ``ROOT/<Folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
(each file may also be ``….gz``); ``download: true`` fetches the files with torchvision where there is
network. Images become (N, 1, S, S) float32 in [-1, 1], labels int64 (N,).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import DATASETS, ConfigError, DataNotFound
from .base import TensorDataset

IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
SPLITS = ("train", "test")
_PREFIX = {"train": "train", "test": "t10k"}

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(k) for k in range(10))


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (plain, or gzip when the name ends in .gz), native byte order."""
    path = Path(path)
    layout = (
        "an IDX file: bytes 0, 0, a type code (0x08 uint8, ...), ndim, then ndim big-endian uint32 sizes and the values"
    )
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DataNotFound(f"{path}: no such file (expected {layout})") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; a cut .gz raises EOFError
        raise ConfigError(f"{path}: unreadable ({type(exc).__name__}: {exc}); expected {layout}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES or raw[3] == 0:
        raise ConfigError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'empty'}); expected {layout}")
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} sizes need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ConfigError(f"{path}: {what}: {len(raw)} bytes, but its header {dims} of {dtype.name} says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def idx_file(raw_dir: Path, stem: str) -> Path | None:
    """``raw_dir/stem`` or ``raw_dir/stem.gz``, whichever exists (the uncompressed one first)."""
    for cand in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def split_stems(split: str) -> tuple[str, str]:
    prefix = _PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def read_idx_split(raw_dir: Path, split: str, *, what: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W), labels int64 (N,)) of one split, checked against each other."""
    images_stem, labels_stem = split_stems(split)
    paths = {stem: idx_file(raw_dir, stem) for stem in (images_stem, labels_stem)}
    missing = [stem for stem, p in paths.items() if p is None]
    if missing:
        raise DataNotFound(
            f"{what}: missing {', '.join(missing)} (or .gz) under {raw_dir}; expected the "
            f"torchvision layout {raw_dir}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz], "
            f"or set data.download=true"
        )
    images, labels = read_idx(paths[images_stem]), read_idx(paths[labels_stem])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ConfigError(f"{paths[images_stem]}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ConfigError(
            f"{paths[labels_stem]}: expected {len(images)} labels (one per image in "
            f"{paths[images_stem].name}), got shape {labels.shape}"
        )
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(
            f"{paths[labels_stem]}: labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}"
        )
    return images, labels


def _download(dataset_cls, root: str, what: str) -> None:
    try:
        for train in (True, False):
            dataset_cls(str(Path(root).expanduser()), train=train, download=True)
    except Exception as exc:  # network or disk errors, reported as one line
        raise ConfigError(
            f"{what}: download to {root} failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}"
        ) from None


def _idx_image_set(
    name: str,
    folder: str,
    classes: tuple[str, ...],
    *,
    root: str,
    split: str,
    conditional: bool,
    image_size: int,
    download: bool,
    resize_any: bool,
) -> TensorDataset:
    what = f"dataset '{name}'"
    if split not in SPLITS:
        raise ConfigError(f"{what}: key 'split' must be one of {', '.join(SPLITS)}, got {split!r}")
    allowed = "28 (native) or 32 (2 background pixels padded on each side)"
    if image_size < 1 or (not resize_any and image_size not in (28, 32)):
        raise ConfigError(f"{what}: key 'image_size' must be {allowed if not resize_any else '>= 1'}, got {image_size}")
    raw_dir = Path(root).expanduser() / folder / "raw"
    if download and any(idx_file(raw_dir, s) is None for sp in SPLITS for s in split_stems(sp)):
        import torchvision

        _download(getattr(torchvision.datasets, folder), root, what)
    images, labels = read_idx_split(raw_dir, split, what=what, num_classes=len(classes))
    x = torch.from_numpy(images).unsqueeze(1).to(torch.float32) / 127.5 - 1.0
    if image_size == 32 and x.shape[-1] == 28:
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # lossless: the background is -1
    elif image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    y = torch.from_numpy(labels)
    ds_name = name if split == "train" else f"{name}_test"
    ds = TensorDataset(
        x, y if conditional else None, num_classes=len(classes) if conditional else 0, kind="image", name=ds_name
    )
    ds.family, ds.split, ds.class_names = name, split, classes
    options = dict(root=root, image_size=image_size, download=False)
    ds.load_split = lambda other, conditional=conditional: DATASETS.build(
        name, split=other, conditional=conditional, **options
    )
    return ds


@DATASETS.register("fashion_mnist", tags=("image",))
def fashion_mnist(
    root: str = "data",
    split: Literal["train", "test"] = "train",
    conditional: bool = True,
    image_size: int = 28,
    download: bool = False,
) -> TensorDataset:
    """Fashion-MNIST (Xiao et al. 2017): 60 000 train / 10 000 test 28x28 grayscale photographs of
    clothing in 10 classes (T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag,
    Ankle boot), as (N, 1, S, S) in [-1, 1].

    Reads ``ROOT/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or ``.gz``).
    ``image_size``: 28, or 32 (2 background pixels padded on each side, for backbones that halve
    the resolution more than twice). ``download=True`` fetches the files with torchvision first
    (needs network). ``conditional=False`` drops the labels."""
    return _idx_image_set(
        "fashion_mnist",
        "FashionMNIST",
        FASHION_CLASSES,
        root=root,
        split=split,
        conditional=conditional,
        image_size=image_size,
        download=download,
        resize_any=False,
    )


@DATASETS.register("mnist", tags=("image",))
def mnist(
    root: str = "data",
    split: Literal["train", "test"] = "train",
    conditional: bool = False,
    image_size: int = 28,
    download: bool = False,
) -> TensorDataset:
    """MNIST (60 000 train / 10 000 test 28x28 handwritten digits, 10 classes) as (N, 1, S, S) in [-1, 1].

    Reads ``ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or ``.gz``); ``download=True``
    fetches them first (needs network). ``image_size``: 28 native; 32 pads 2 background pixels on
    each side (LeNet style); any other size resizes bilinearly. ``conditional=False`` (default) drops
    the labels."""
    return _idx_image_set(
        "mnist",
        "MNIST",
        MNIST_CLASSES,
        root=root,
        split=split,
        conditional=conditional,
        image_size=image_size,
        download=download,
        resize_any=True,
    )
