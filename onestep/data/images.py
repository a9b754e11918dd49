"""Finite image sets, held in memory as ``TensorDataset``s with x (N, C, S, S) in [-1, 1] and y (N,) int64.

``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 grayscale images, 10 classes); ships
with the dependencies.

Real sets read from a local ``root`` (a missing root is a one-line ``ConfigError`` saying how to get
the data; ``download: true`` fetches CIFAR-10 with torchvision where there is network):

- ``cifar10``: the python batches ``ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.
- ``mnist``, ``fashion_mnist``: IDX files in torchvision's layout (``onestep.data.idx``).
- ``imagefolder``: ``ROOT/CLASS/*.png|jpg|...``, center-cropped and resized with PIL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import DATASETS, ConfigError, DataNotFound
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
    ds = _labelled(x, y, 10, conditional, name)
    ds.family, ds.split, ds.class_names = "digits", split, tuple(str(k) for k in range(10))
    ds.load_split = lambda other, conditional=conditional: digits(conditional, split=other, image_size=image_size)
    return ds


# ----------------------------------------------------------------------------------------------
# Real image sets read from a local root (no download unless ``download: true``).

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) in [0, 255] -> float32 in [-1, 1]."""
    return x.to(torch.float32) / 127.5 - 1.0


def _labelled(x: torch.Tensor, y: torch.Tensor, num_classes: int, conditional: bool, name: str) -> TensorDataset:
    if conditional:
        return TensorDataset(x, y, num_classes=num_classes, kind="image", name=name)
    return TensorDataset(x, None, num_classes=0, kind="image", name=name)


def _cifar10_folder(root: str) -> Path | None:
    """The ``cifar-10-batches-py`` folder under root (or root itself if it is that folder)."""
    base = Path(root).expanduser()
    for cand in (base / CIFAR10_FOLDER, base):
        if all((cand / f).is_file() for f in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES):
            return cand
    return None


def read_cifar10(folder, train: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read the CIFAR-10 python batches: (x uint8 (N, 3, 32, 32), y int64 (N,), class names).

    The batches are pickles by design; they are read with a restricted unpickler that builds only
    plain data and numpy arrays (``onestep.utils.safe_pickle``), so a crafted file cannot run code."""
    from pathlib import Path

    import numpy as np

    from onestep.utils.safe_pickle import load_plain_pickle

    folder = Path(folder)
    xs, ys = [], []
    for name in CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES:
        entry = load_plain_pickle(folder / name)
        if not isinstance(entry, dict):
            raise ConfigError(f"{folder / name}: a CIFAR-10 batch is a dict with 'data' and 'labels'")
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry["labels"], dtype=np.int64))
    names = [str(i) for i in range(10)]
    meta = folder / "batches.meta"
    if meta.is_file():
        info = load_plain_pickle(meta)
        info = {k.decode() if isinstance(k, bytes) else k: v for k, v in info.items()}
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in info.get("label_names", names)]
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), names


@DATASETS.register("cifar10", tags=("image",))
def cifar10(root: str = "data", train: bool = True, download: bool = False, conditional: bool = False) -> TensorDataset:
    """CIFAR-10 (50 000 train / 10 000 test 32x32 RGB images, 10 classes) as (N, 3, 32, 32) in [-1, 1].

    Reads the python version (``ROOT/cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
    ``batches.meta``). ``download=True`` fetches it with torchvision first (needs network).
    ``conditional=False`` (the default, as in the unconditional CIFAR-10 results) drops the labels.
    """
    folder = _cifar10_folder(root)
    if folder is None and download:
        try:
            import torchvision

            torchvision.datasets.CIFAR10(root, train=train, download=True)
        except Exception as exc:  # network or disk errors, reported as one line
            raise ConfigError(
                f"dataset 'cifar10': download to {root} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            ) from None
        folder = _cifar10_folder(root)
    if folder is None:
        raise DataNotFound(
            f"dataset 'cifar10': no CIFAR-10 python batches under data.root={root} (expected "
            f"{root}/{CIFAR10_FOLDER}/data_batch_1..5 and test_batch); download {CIFAR10_URL} and extract it "
            f"into {root}, or set data.download=true"
        )
    x, y, _ = read_cifar10(folder, train)
    return _labelled(uint8_to_unit(x), y, 10, conditional, "cifar10" if train else "cifar10_test")


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def center_crop_resize(image, image_size: int):
    """PIL image -> square ``image_size`` image: box-halve while the short side >= 2·size, bicubic
    resize so the short side is ``image_size``, then center crop (ADM's preprocessing)."""
    from PIL import Image

    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(max(image_size, round(s * scale)) for s in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - image_size) // 2
    top = (image.size[1] - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def image_files(folder: str | Path) -> list[Path]:
    """Image files (IMAGE_EXTENSIONS, any case) anywhere under ``folder``, sorted; hidden names skipped."""
    folder = Path(folder).expanduser()
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def class_folders(root: str | Path, what: str) -> tuple[list[Path], list[int], list[str]]:
    """ImageNet-style ROOT/CLASS/**/image files -> (files, labels, class names): classes are the
    sorted subfolder names, label = index in that list. ``what`` names the caller in errors."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataNotFound(f"{what}: {root} is not a directory (expected ROOT/CLASS/image files)")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"{what}: no class subfolders in {root} (expected ROOT/CLASS/image files)")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = image_files(base / name)
        files += found
        labels += [label] * len(found)
    if not files:
        raise ConfigError(f"{what}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
    return files, labels, classes


def load_image(path: str | Path, image_size: int | None = None, mode: str = "RGB") -> np.ndarray:
    """One image file as uint8 (H, W, channels) in ``mode`` ("RGB" or "L"), ADM center crop to
    ``image_size`` when given (``center_crop_resize``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if image_size is not None:
                im = center_crop_resize(im, image_size)
            arr = np.array(im, dtype=np.uint8)  # a writable copy
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ConfigError(
            f"{path}: not a readable image ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'truncated or corrupt'})"
        ) from None
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


class ImageFiles(torch.utils.data.Dataset):
    """Image files read lazily as uint8 (3, S, S) RGB tensors, ADM-center-cropped to ``image_size``
    (as read when None: then all files must share one size). Item i is ``files[i]``."""

    def __init__(self, files: list[Path], image_size: int | None = None):
        self.files = list(files)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(load_image(self.files[i], self.image_size)).permute(2, 0, 1).contiguous()


@DATASETS.register("imagefolder", tags=("image",))
def imagefolder(root: str, image_size: int = 32, channels: int = 3, conditional: bool = True) -> TensorDataset:
    """Class subfolders of images (ROOT/CLASS/*.png, ...) as (N, channels, S, S) in [-1, 1].

    Each image is center-cropped and resized to ``image_size`` with PIL; labels are the class
    folders' indices in sorted name order. ``channels``: 3 (RGB) or 1 (grayscale). Held in memory."""
    if channels not in (1, 3):
        raise ConfigError(f"dataset 'imagefolder': key 'channels' must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ConfigError(f"dataset 'imagefolder': key 'image_size' must be >= 1, got {image_size}")
    files, labels, classes = class_folders(root, "dataset 'imagefolder'")
    mode = "RGB" if channels == 3 else "L"
    images = [load_image(path, image_size, mode) for path in files]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(labels, dtype=torch.int64)
    return _labelled(uint8_to_unit(x), y, len(classes), conditional, f"imagefolder_{Path(root).expanduser().name}")
