"""Real-data loaders on tiny files written in the real on-disk formats (no network):
CIFAR-10 python batches, MNIST idx files in torchvision's layout, and a folder of PNGs."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from onestep.config import from_dict
from onestep.registry import DATASETS, ConfigError

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root, per_batch=2, test=3, bytes_keys_batch=2):
    """ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} as CIFAR-10 ships them:
    dicts with 'data' (N, 3072) uint8 (R, G, B planes, row-major) and 'labels' (list of ints)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = per_batch
    batches["test_batch"] = test
    written = {}
    for index, (name, n) in enumerate(batches.items()):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int((index * 3 + j) % 10) for j in range(n)]
        entry = {
            "batch_label": f"{name} of 5",
            "labels": labels,
            "data": data,
            "filenames": [f"img_{index}_{j}.png" for j in range(n)],
        }
        if index + 1 == bytes_keys_batch:  # the python-2 pickles decode their keys as bytes in some setups
            entry = {k.encode(): v for k, v in entry.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": per_batch, "label_names": CIFAR_NAMES, "num_vis": 3072}, f, protocol=2)
    return written


def write_idx(path, array: np.ndarray):
    """An MNIST idx file: magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root, n_train=5, n_test=3, folder="MNIST", gz=False):
    """``ROOT/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` with random images and
    labels 0..9 (torchvision's layout, shared by MNIST and Fashion-MNIST)."""
    import gzip

    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 7 + 3) % 10
        for stem, array in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
            write_idx(raw / stem, array)
            if gz:
                (raw / f"{stem}.gz").write_bytes(gzip.compress((raw / stem).read_bytes()))
                (raw / stem).unlink()
        out[split] = (images, labels)
    return out


# ----------------------------------------------------------------------------------------------
# CIFAR-10.


def test_cifar10_python_batches(tmp_path):
    written = write_cifar10(tmp_path)
    ds = DATASETS.build("cifar10", root=str(tmp_path), conditional=True)
    assert ds.size == 10 and ds.shape == (3, 32, 32) and ds.kind == "image" and ds.num_classes == 10
    assert ds.x.dtype == torch.float32 and ds.x.min() >= -1 and ds.x.max() <= 1
    data, labels = written["data_batch_1"]
    # Pixel (row 1, col 2) of image 0: R at 32 + 2, G at 1024 + 34, B at 2048 + 34.
    for c in range(3):
        assert ds.x[0, c, 1, 2].item() == pytest.approx(data[0, c * 1024 + 34] / 127.5 - 1)
    expected = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert ds.y.tolist() == expected
    # Batch 2 had bytes keys and still loads in order.
    assert torch.equal(ds.x[2], torch.from_numpy(written["data_batch_2"][0][0].reshape(3, 32, 32)).float() / 127.5 - 1)
    test = DATASETS.build("cifar10", root=str(tmp_path), train=False)
    assert test.size == 3 and test.y is None and test.num_classes == 0 and test.name == "cifar10_test"
    # Extreme values map to the ends of [-1, 1].
    assert ds.x.min().item() == -1.0 and ds.x.max().item() == 1.0
    # The batches folder itself is also accepted as the root.
    assert DATASETS.build("cifar10", root=str(tmp_path / "cifar-10-batches-py")).size == 10


def test_cifar10_missing_root_says_how_to_get_it(tmp_path):
    with pytest.raises(ConfigError, match=r"cifar-10-python.tar.gz.*data.download=true"):
        DATASETS.build("cifar10", root=str(tmp_path / "nowhere"))


def test_cifar10_through_a_recipe(tmp_path):
    write_cifar10(tmp_path)
    cfg = from_dict(
        {
            "data": {"name": "cifar10", "root": str(tmp_path)},
            "backbone": {"name": "test_unet"},
            "objective": {"name": "consistency_training", "total_steps": 10},
        }
    )
    from onestep.build import build_backbone, build_dataset

    ds = build_dataset(cfg)
    net = build_backbone(cfg, ds)
    assert net.input_shape == (3, 32, 32)


# ----------------------------------------------------------------------------------------------
# MNIST.


def test_mnist_idx_files(tmp_path):
    written = write_mnist(tmp_path)
    ds = DATASETS.build("mnist", root=str(tmp_path), conditional=True)
    images, labels = written["train"]
    assert ds.size == 5 and ds.shape == (1, 28, 28) and ds.num_classes == 10
    assert torch.allclose(ds.x[:, 0], torch.from_numpy(images).float() / 127.5 - 1)
    assert ds.y.tolist() == labels.tolist()
    padded = DATASETS.build("mnist", root=str(tmp_path), split="test", image_size=32)
    test_images, _ = written["t10k"]
    assert padded.size == 3 and padded.shape == (1, 32, 32) and padded.y is None
    assert (padded.x[:, :, :2] == -1).all() and (padded.x[:, :, :, -2:] == -1).all()
    assert torch.allclose(padded.x[:, 0, 2:30, 2:30], torch.from_numpy(test_images).float() / 127.5 - 1)
    resized = DATASETS.build("mnist", root=str(tmp_path), image_size=16)
    assert resized.shape == (1, 16, 16) and resized.x.min() >= -1 and resized.x.max() <= 1


def test_mnist_missing_files(tmp_path):
    with pytest.raises(ConfigError, match=r"MNIST.*raw.*data.download=true"):
        DATASETS.build("mnist", root=str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (the same IDX reader).


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_idx_files(tmp_path, gz):
    written = write_mnist(tmp_path, n_train=7, n_test=4, folder="FashionMNIST", gz=gz)
    ds = DATASETS.build("fashion_mnist", root=str(tmp_path))
    images, labels = written["train"]
    assert ds.size == 7 and ds.shape == (1, 28, 28) and ds.num_classes == 10 and ds.name == "fashion_mnist"
    assert torch.equal(ds.x[:, 0], torch.from_numpy(images).float() / 127.5 - 1)
    assert ds.y.tolist() == labels.tolist() and ds.class_names[9] == "Ankle boot"
    test = DATASETS.build("fashion_mnist", root=str(tmp_path), split="test", image_size=32, conditional=False)
    assert test.size == 4 and test.shape == (1, 32, 32) and test.y is None and test.name == "fashion_mnist_test"
    assert torch.equal(test.x[:, 0, 2:30, 2:30], torch.from_numpy(written["t10k"][0]).float() / 127.5 - 1)
    assert (test.x[:, :, :2] == -1).all() and (test.x[:, :, -2:] == -1).all()
    assert torch.equal(ds.load_split("test").x, DATASETS.build("fashion_mnist", root=str(tmp_path), split="test").x)


def test_fashion_mnist_bad_options_and_files(tmp_path):
    with pytest.raises(
        ConfigError, match=r"missing train-images-idx3-ubyte.*FashionMNIST/raw.*torchvision layout.*download"
    ):
        DATASETS.build("fashion_mnist", root=str(tmp_path))
    write_mnist(tmp_path, folder="FashionMNIST")
    with pytest.raises(ConfigError, match=r"'image_size' must be 28 .* or 32"):
        DATASETS.build("fashion_mnist", root=str(tmp_path), image_size=16)
    with pytest.raises(ConfigError, match=r"'split' must be one of 'train', 'test'"):
        DATASETS.build("fashion_mnist", root=str(tmp_path), split="val")
    raw = tmp_path / "FashionMNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(good[:-5])
    with pytest.raises(
        ConfigError, match=r"train-images-idx3-ubyte: truncated: .* bytes, but its header \(5, 28, 28\)"
    ):
        DATASETS.build("fashion_mnist", root=str(tmp_path))
    images.write_bytes(b"GIF89a" + good[6:])
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte: not an IDX file"):
        DATASETS.build("fashion_mnist", root=str(tmp_path))
    images.write_bytes(good)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(4))  # 4 labels for 5 images
    with pytest.raises(ConfigError, match=r"train-labels-idx1-ubyte: expected 5 labels"):
        DATASETS.build("fashion_mnist", root=str(tmp_path))
    write_idx(raw / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 12]))
    with pytest.raises(ConfigError, match=r"labels must be in 0..9"):
        DATASETS.build("fashion_mnist", root=str(tmp_path))
    (raw / "train-labels-idx1-ubyte").unlink()
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ConfigError, match=r"train-labels-idx1-ubyte.gz: unreadable"):
        DATASETS.build("fashion_mnist", root=str(tmp_path))


def test_idx_reader_types(tmp_path):
    import struct

    from onestep.data.idx import read_idx

    values = np.arange(6, dtype=">i4").reshape(2, 3)
    path = tmp_path / "a.idx"
    path.write_bytes(struct.pack(">BBBB", 0, 0, 0x0C, 2) + struct.pack(">2I", 2, 3) + values.tobytes())
    out = read_idx(path)
    assert out.dtype == np.int32 and out.tolist() == [[0, 1, 2], [3, 4, 5]]


# ----------------------------------------------------------------------------------------------
# Image folder.


def test_imagefolder_pngs(tmp_path):
    from PIL import Image

    # Class folders out of order on purpose: labels follow sorted names (cat = 0, dog = 1).
    for name, color in (("dog", (0, 0, 255)), ("cat", (255, 0, 0))):
        (tmp_path / name).mkdir()
        for i in range(2):
            arr = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
            arr[:, 10:30] = color  # the centre square keeps the color
            Image.fromarray(arr).save(tmp_path / name / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = DATASETS.build("imagefolder", root=str(tmp_path), image_size=8)
    assert ds.size == 4 and ds.shape == (3, 8, 8) and ds.num_classes == 2
    assert ds.y.tolist() == [0, 0, 1, 1]
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    # Center crop removed the black side bands: cats are red, dogs blue.
    assert torch.allclose(ds.x[0, :, 4, 4], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)
    assert torch.allclose(ds.x[3, :, 4, 4], torch.tensor([-1.0, -1.0, 1.0]), atol=0.05)
    assert ds.x[2:, 2].min() > 0.5 and ds.x[:2, 0].min() > 0.5  # no black band left
    gray = DATASETS.build("imagefolder", root=str(tmp_path), image_size=4, channels=1, conditional=False)
    assert gray.shape == (1, 4, 4) and gray.y is None and gray.num_classes == 0


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        DATASETS.build("imagefolder", root=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no class subfolders"):
        DATASETS.build("imagefolder", root=str(tmp_path))
    (tmp_path / "a").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        DATASETS.build("imagefolder", root=str(tmp_path))
