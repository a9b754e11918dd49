"""Every file the toolkit reads, corrupt or of the wrong kind, gets one line: a table of file kinds x
corruptions (truncated, garbled, swapped for a file of another kind). Each case runs the CLI command
that reads the file and asserts exit code 2, one line on stderr naming the file, a word of what was
expected, and that nothing in the run directory changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from onestep.cli import main

TINY = """
seed: 1
data: {name: checkerboard}
backbone: {name: test_mlp}
objective: {name: flow_matching}
train: {steps: 4, batch_size: 16, lr: 1e-3, log_every: 2, checkpoint_every: 2, num_preview: 4}
eval: {nfe: [1], num_samples: 64}
"""
DIGITS = """
seed: 1
data: {name: digits}
backbone: {name: dit, patch_size: 2, depth: 1, hidden_size: 32, num_heads: 2}
objective: {name: flow_matching}
train: {steps: 2, batch_size: 16, lr: 1e-3, log_every: 1, checkpoint_every: 0, num_preview: 4}
eval: {nfe: [1], num_samples: 32}
"""
PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde\x00\x00"
    b"\x00\x0cIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7\x35\x81\x84\x00\x00\x00\x00IEND\xaeB`\x82"
)


def truncated(data: bytes) -> bytes:
    return data[: max(1, len(data) // 2)]


def garbled(data: bytes) -> bytes:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=max(len(data), 64), dtype=np.uint8).tobytes()


def swapped(data: bytes) -> bytes:
    return PNG


CORRUPTIONS = {"truncated": truncated, "garbled": garbled, "swapped": swapped}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny trained toy run, a digits run, an export, data files of every reader, made once."""
    root = tmp_path_factory.mktemp("corrupt")
    (root / "tiny.yaml").write_text(TINY)
    (root / "digits.yaml").write_text(DIGITS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        assert main(["train", str(root / "tiny.yaml"), "--run-dir", str(root / "run"), "--no-progress"]) == 0
        assert main(["train", str(root / "digits.yaml"), "--run-dir", str(root / "drun"), "--no-progress"]) == 0
        assert main(["export", str(root / "run"), "--out", str(root / "export")]) == 0
    from test_loaders import write_cifar10, write_mnist

    write_mnist(root / "fashion", folder="FashionMNIST")
    write_cifar10(root / "cifar")
    shards = root / "latents"
    shards.mkdir()
    np.savez(shards / "shard_000.npz", latents=np.zeros((4, 4, 4, 4), np.float32), labels=np.zeros(4, np.int64))
    (root / "stats.npz").write_bytes(_npz_bytes(root, mu=np.zeros(8), sigma=np.eye(8)))
    (root / "images.npz").write_bytes(_npz_bytes(root, arr_0=np.zeros((4, 8, 8, 3), np.uint8)))
    (root / "inception.pth").write_bytes(_torch_bytes({"w": torch.zeros(3)}))
    return root


def _npz_bytes(root, **arrays) -> bytes:
    path = root / "tmp.npz"
    np.savez(path, **arrays)
    data = path.read_bytes()
    path.unlink()
    return data


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _dataset_recipe(root: Path, data: str) -> Path:
    path = root / f"data_{abs(hash(data))}.yaml"
    path.write_text(TINY.replace("data: {name: checkerboard}", f"data: {data}").replace("test_mlp", "test_dit"))
    return path


# kind -> (path of the file to corrupt (relative to the world), the command, words the line must hold)
def cases(root: Path):
    run, drun, export = root / "run", root / "drun", root / "export"
    fashion = root / "fashion" / "FashionMNIST" / "raw"
    return {
        "recipe": (root / "tiny.yaml", ["validate", str(root / "tiny.yaml")], ["recipe"]),
        "run config": (run / "config.yaml", ["compare", str(run)], ["config.yaml"]),
        "checkpoint (eval)": (run / "checkpoints" / "last.pt", ["eval", str(run)], ["checkpoint"]),
        "checkpoint (resume)": (
            run / "checkpoints" / "last.pt",
            ["train", "--resume", str(run), "train.steps=9"],
            ["checkpoint"],
        ),
        "checkpoint (sample)": (
            run / "checkpoints" / "last.pt",
            ["sample", str(run), "-n", "2", "--out", str(root / "out.npz")],
            ["checkpoint"],
        ),
        "export weights": (
            export / "model.safetensors",
            ["sample", str(export), "-n", "2", "--out", str(root / "out.npz")],
            ["safetensors"],
        ),
        "export config": (
            export / "config.yaml",
            ["sample", str(export), "-n", "2", "--out", str(root / "out.npz")],
            ["config.yaml"],
        ),
        "public dit checkpoint": (
            root / "public_dit.pt",
            ["sample", f"dit:{root / 'public_dit.pt'}", "-n", "1", "--out", str(root / "out.npz")],
            ["checkpoint"],
        ),
        "public sit checkpoint": (
            root / "public_sit.pt",
            ["sample", f"sit:{root / 'public_sit.pt'}", "-n", "1", "--out", str(root / "out.npz")],
            ["checkpoint"],
        ),
        "FID statistics npz": (
            root / "stats.npz",
            [
                "eval",
                str(drun),
                "--metrics",
                "fid",
                "--feature-extractor",
                "onestep-random-conv",
                "--reference",
                str(root / "stats.npz"),
            ],
            ["npz"],
        ),
        "reference images npz": (
            root / "images.npz",
            [
                "eval",
                str(drun),
                "--metrics",
                "kid",
                "--feature-extractor",
                "onestep-random-conv",
                "--reference",
                str(root / "images.npz"),
            ],
            ["npz"],
        ),
        "IDX images": (
            fashion / "train-images-idx3-ubyte",
            [
                "train",
                str(_dataset_recipe(root, f"{{name: fashion_mnist, root: {root / 'fashion'}}}")),
                "--run-dir",
                str(root / "never_idx"),
            ],
            ["IDX"],
        ),
        "IDX labels": (
            fashion / "train-labels-idx1-ubyte",
            [
                "train",
                str(_dataset_recipe(root, f"{{name: fashion_mnist, root: {root / 'fashion'}}}")),
                "--run-dir",
                str(root / "never_idx"),
            ],
            ["IDX"],
        ),
        "CIFAR-10 batch": (
            root / "cifar" / "cifar-10-batches-py" / "data_batch_1",
            [
                "train",
                str(_dataset_recipe(root, f"{{name: cifar10, root: {root / 'cifar'}}}")),
                "--run-dir",
                str(root / "never_cifar"),
            ],
            ["CIFAR-10", "pickle"],
        ),
        "latent shard": (
            root / "latents" / "shard_000.npz",
            [
                "train",
                str(_dataset_recipe(root, f"{{name: latents, root: {root / 'latents'}}}")),
                "--run-dir",
                str(root / "never_latents"),
            ],
            ["npz"],
        ),
        "Inception weights": (
            root / "inception.pth",
            ["eval", str(drun), "--metrics", "fid"],
            ["Inception", "weights"],
        ),
    }


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


TABLE = [
    (kind, corruption)
    for kind in (
        "recipe",
        "run config",
        "checkpoint (eval)",
        "checkpoint (resume)",
        "checkpoint (sample)",
        "export weights",
        "export config",
        "public dit checkpoint",
        "public sit checkpoint",
        "FID statistics npz",
        "reference images npz",
        "IDX images",
        "IDX labels",
        "CIFAR-10 batch",
        "latent shard",
        "Inception weights",
    )
    for corruption in CORRUPTIONS
]


@pytest.mark.parametrize("kind,corruption", TABLE)
def test_corrupt_file_gets_one_line(world, kind, corruption, capsys, monkeypatch):
    path, cmd, words = cases(world)[kind]
    original = path.read_bytes() if path.exists() else _torch_bytes({"model": {"x": torch.zeros(2)}})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if kind == "Inception weights":
        monkeypatch.setenv("ONESTEP_INCEPTION_WEIGHTS", str(path))
    runs = {name: _snapshot(world / name) for name in ("run", "drun", "export")}
    path.write_bytes(CORRUPTIONS[corruption](original))
    try:
        capsys.readouterr()
        code = main(cmd)
        err = capsys.readouterr().err.strip()
    finally:
        path.write_bytes(original)
    assert code == 2, (kind, corruption, err[-3000:])
    assert err.count("\n") == 0 and err, (kind, corruption, err[-3000:])
    assert path.name in err, (kind, corruption, err)
    assert any(w.lower() in err.lower() for w in words), (kind, corruption, err)
    for name, before in runs.items():
        assert _snapshot(world / name) == before, (kind, corruption, name)


def test_corrupt_file_table_covers_every_reader():
    """The table's kinds: recipes, run directories, checkpoints (own, exported, public), reference npz
    files, dataset files, feature-extractor weights (the classifier cache: test_eval_metrics)."""
    assert len(TABLE) == 16 * 3
