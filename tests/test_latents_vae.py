"""SD-VAE latents end to end on the CPU with a tiny randomly initialized diffusers AutoencoderKL.

The VAE is written with ``save_pretrained`` and loaded by path through the real loader; images are
real PNG/JPEG files in class subfolders; FID goes through torch-fidelity with the download-free
``onestep-random-conv`` extractor. Nothing touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onestep.cli import main
from onestep.data.images import ImageFiles, image_files, load_image, uint8_to_unit
from onestep.data.latents import SD_VAE_SCALE
from onestep.data.vae import INSTALL_HINT, load_autoencoder, load_vae
from onestep.eval import fidelity
from onestep.registry import DATASETS, ConfigError

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
RC = fidelity.RANDOM_CONV
RES = 16  # image side; the tiny VAE halves it: latents (4, 8, 8), test_dit's default input
CLASSES = ["ant", "bee", "cat"]
# (class, file name, width, height): several sizes and aspects, PNG and JPEG (any case).
IMAGES = [
    ("cat", "c0.png", 40, 30),
    ("cat", "c1.JPEG", 17, 64),
    ("ant", "a0.jpg", 50, 50),
    ("ant", "sub/a1.png", 90, 35),
    ("ant", "a2.png", 16, 16),
    ("bee", "b0.jpeg", 33, 70),
    ("bee", "b1.png", 64, 48),
    ("bee", "b2.png", 20, 27),
    ("cat", "c2.png", 128, 40),
    ("ant", "a3.png", 31, 19),
]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one thread beats two on a shared box
encode_tool = _load_tool("encode_latents")
fid_stats_tool = _load_tool("fid_stats")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RES,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny_vae"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageNet-style ROOT/CLASS/... with random-colour images, plus files the tools must ignore."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for cls, name, w, h in IMAGES:
        path = root / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (1, 1, 3))
        arr = np.clip(base + rng.integers(-60, 60, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "bee" / ".hidden.png").write_bytes(b"not an image either")
    return root


def _encode(src, out, *extra, env=None, monkeypatch=None):
    if monkeypatch is not None:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(key, raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, str(value))
    threads = torch.get_num_threads()
    try:  # one thread always, so reruns give the same bits
        return encode_tool.main(
            [
                str(src),
                str(out),
                "--resolution",
                str(RES),
                "--shard-size",
                "4",
                "--workers",
                "0",
                "--batch-size",
                "3",
                "--threads",
                "1",
                *map(str, extra),
            ]
        )
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoded(folder, vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "in16"
    with pytest.MonkeyPatch.context() as mp:
        _encode(folder, out, "--flip", "--vae", vae_dir, monkeypatch=mp)
    return out


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.npz"))}


# ------------------------------------------------------------------------------------ the VAE


def test_vae_wrapper_encodes_and_decodes_like_diffusers(vae_dir):
    vae = load_vae(str(vae_dir), batch_size=3)
    assert vae.downsample == 2 and vae.latent_channels == 4
    x = torch.rand(5, 3, RES, RES) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (5, 4, RES // 2, RES // 2) and z.dtype == torch.float32
    model = load_autoencoder(str(vae_dir))
    with torch.no_grad():
        want = model.encode(x).latent_dist.mean
        images = model.decode(want).sample
    assert torch.allclose(z, want, atol=1e-5)  # the unscaled posterior mean, chunked in threes
    decoded = vae.decode(z)
    assert decoded.shape == (5, 3, RES, RES)
    assert torch.allclose(decoded, images.clamp(-1, 1), atol=1e-5)
    assert decoded.min() >= -1 and decoded.max() <= 1
    drawn = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == z.shape and not torch.allclose(drawn, z)
    with pytest.raises(ValueError, match=r"\(N, 4, h, w\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))


@pytest.fixture
def no_network(monkeypatch):
    """Records any network attempt (and makes it fail)."""
    attempts = []

    def forbidden(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket, "create_connection", forbidden)
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)
    monkeypatch.setattr(socket.socket, "connect", forbidden)
    return attempts


def test_vae_loading_from_cache_and_errors(vae_dir, tmp_path, monkeypatch, no_network):
    with pytest.raises(ConfigError, match="config.json") as info:
        load_vae(str(tmp_path / "no_such_dir"))
    assert "\n" not in str(info.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1") as info:
        load_vae("onestep-test/no-such-vae")
    assert "\n" not in str(info.value) and "onestep-test/no-such-vae" in str(info.value)
    # A hub id already in the Hugging Face cache loads from there, offline or not, without network.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    snapshot = tmp_path / "hub" / "models--onestep-test--tiny-vae" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in vae_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    vae = load_vae("onestep-test/tiny-vae", cache_dir=str(tmp_path / "hub"))
    assert vae.latent_channels == 4 and vae.name == "onestep-test/tiny-vae"
    assert no_network == []
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if diffusers were not installed
    with pytest.raises(ConfigError) as info:
        load_vae(str(tmp_path))
    assert INSTALL_HINT in str(info.value) and "\n" not in str(info.value)
    assert INSTALL_HINT == "pip install 'onestep[vae]'"


# ------------------------------------------------------------------------------ ADM center crop


def test_adm_center_crop_on_a_known_image(tmp_path):
    # 600x300: red | green | blue thirds. ADM at 32: box-halve to 300x150, 150x75, 75x37
    # (37 < 64), bicubic to 65x32, crop columns 16..47 -> red, green, blue in about 6:22:4.
    arr = np.zeros((300, 600, 3), np.uint8)
    arr[:, :200, 0] = arr[:, 200:400, 1] = arr[:, 400:, 2] = 255
    path = tmp_path / "stripes.png"
    Image.fromarray(arr).save(path)
    out = load_image(path, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    row = out[16].astype(int)
    dominant = row.argmax(axis=1)
    assert (
        dominant[:4].tolist() == [0] * 4 and dominant[9:25].tolist() == [1] * 16 and dominant[-2:].tolist() == [2] * 2
    )
    assert 4 <= (dominant == 0).sum() <= 7 and 2 <= (dominant == 2).sum() <= 6  # centered, aspect kept
    # Exactly guided-diffusion's recipe.
    im = Image.fromarray(arr)
    while min(im.size) >= 64:
        im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
    scale = 32 / min(im.size)
    im = im.resize(tuple(round(s * scale) for s in im.size), resample=Image.BICUBIC)
    ref = np.array(im)
    top, left = (ref.shape[0] - 32) // 2, (ref.shape[1] - 32) // 2
    assert np.array_equal(out, ref[top : top + 32, left : left + 32])
    # Already the right size: unchanged.
    small = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    assert np.array_equal(load_image(tmp_path / "small.png", 32), small)


# ------------------------------------------------------------------------------ encode_latents


def test_encode_latents_shards_labels_flips(encoded, folder, vae_dir):
    assert json.loads((encoded / "classes.json").read_text()) == CLASSES
    meta = json.loads((encoded / "encode_latents.json").read_text())
    assert meta["num_images"] == len(IMAGES) and meta["flip"] and meta["latent_shape"] == [4, 8, 8]
    names = sorted(p.name for p in encoded.iterdir())
    assert names == ["classes.json", "encode_latents.json", "shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    shards = [np.load(encoded / f"shard_0000{i}.npz") for i in range(3)]
    assert [len(s["labels"]) for s in shards] == [4, 4, 2]
    latents = np.concatenate([s["latents"] for s in shards])
    flipped = np.concatenate([s["latents_flip"] for s in shards])
    labels = np.concatenate([s["labels"] for s in shards])
    assert latents.dtype == np.float16 and latents.shape == (10, 4, 8, 8) and flipped.shape == latents.shape
    assert labels.dtype == np.int64
    # Sorted classes, files sorted within each: ant (4 incl. sub/), bee (3), cat (3); junk ignored.
    files = [p.relative_to(folder).as_posix() for p in image_files(folder)]
    assert files == [
        "ant/a0.jpg",
        "ant/a2.png",
        "ant/a3.png",
        "ant/sub/a1.png",
        "bee/b0.jpeg",
        "bee/b1.png",
        "bee/b2.png",
        "cat/c0.png",
        "cat/c1.JPEG",
        "cat/c2.png",
    ]
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Row i is the VAE posterior mean of image i's ADM crop; the flip row that of the mirrored crop.
    crops = uint8_to_unit(torch.stack([ImageFiles(image_files(folder), RES)[i] for i in range(10)]))
    vae = load_vae(str(vae_dir))
    want, want_flip = vae.encode(crops), vae.encode(crops.flip(-1))
    assert torch.allclose(torch.from_numpy(latents).float(), want, atol=2e-3, rtol=2e-3)
    assert torch.allclose(torch.from_numpy(flipped).float(), want_flip, atol=2e-3, rtol=2e-3)
    assert not torch.allclose(want, want_flip, atol=1e-2)


def test_encode_latents_resumes_and_splits_over_ranks(encoded, folder, vae_dir, tmp_path, monkeypatch):
    original = _shards(encoded)
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("classes.json", "encode_latents.json", *original):
        (out / name).write_bytes((encoded / name).read_bytes())
    (out / "shard_00001.npz").unlink()
    kept = {name: (out / name).stat().st_mtime_ns for name in ("shard_00000.npz", "shard_00002.npz")}
    _encode(folder, out, "--flip", "--vae", vae_dir, monkeypatch=monkeypatch)
    assert _shards(out) == original  # the missing shard rewritten byte for byte
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # complete ones untouched
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # Other settings into the same folder are refused.
    with pytest.raises(SystemExit, match="other settings"):
        _encode(folder, out, "--vae", vae_dir, monkeypatch=monkeypatch)

    # Two ranks (as under torchrun): rank r writes shards r, r + 2; together the single-process result.
    split = tmp_path / "split"
    _encode(
        folder,
        split,
        "--flip",
        "--vae",
        vae_dir,
        env={"RANK": 0, "WORLD_SIZE": 2, "LOCAL_RANK": 0},
        monkeypatch=monkeypatch,
    )
    assert sorted(_shards(split)) == ["shard_00000.npz", "shard_00002.npz"]
    _encode(
        folder,
        split,
        "--flip",
        "--vae",
        vae_dir,
        env={"RANK": 1, "WORLD_SIZE": 2, "LOCAL_RANK": 1},
        monkeypatch=monkeypatch,
    )
    assert _shards(split) == original


# ------------------------------------------------------------------------------ latents dataset


def test_latents_dataset_flips_scale_and_decoding(encoded, vae_dir, tmp_path):
    raw = np.concatenate([np.load(encoded / f"shard_0000{i}.npz")["latents"] for i in range(3)])
    ds = DATASETS.build("latents", root=str(encoded), num_classes=3, vae=str(vae_dir))
    assert ds.kind == "latent" and ds.size == 20 and ds.shape == (4, 8, 8) and ds.decodes_to_images
    assert ds.dtype == torch.float16 and ds.rows.mapped  # memory-mapped, in the stored dtype
    x, y = ds.get(torch.arange(20))
    assert x.dtype == torch.float32 and torch.allclose(x[:10], torch.from_numpy(raw).float() * SD_VAE_SCALE)
    assert y.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2] * 2
    plain = DATASETS.build("latents", root=str(encoded), num_classes=3, flip=False)
    assert plain.size == 10 and not plain.decodes_to_images
    with pytest.raises(ConfigError, match="data.vae"):
        plain.decode(x[:2])
    assert DATASETS.build("latents", root=str(encoded), num_classes=3, limit=5).size == 10  # 5 images + flips
    # Decoding: divide by the scale, then the VAE.
    images = ds.decode(x[:3])
    assert images.shape == (3, 3, RES, RES) and images.min() >= -1 and images.max() <= 1
    assert ds.image_shape == (3, RES, RES)
    want = load_vae(str(vae_dir)).decode(torch.from_numpy(raw[:3]).float())
    assert torch.allclose(images, want, atol=1e-5)
    with pytest.raises(ConfigError, match="num_classes=2"):
        DATASETS.build("latents", root=str(encoded), num_classes=2)
    # A shard without flips among shards with them.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(3):
        with np.load(encoded / f"shard_0000{i}.npz") as f:
            arrays = {k: f[k] for k in f.files if not (i == 1 and k == "latents_flip")}
        np.savez(mixed / f"shard_{i}.npz", **arrays)
    with pytest.raises(ConfigError, match="latents_flip"):
        DATASETS.build("latents", root=str(mixed), num_classes=3)
    assert DATASETS.build("latents", root=str(mixed), num_classes=3, flip=False).size == 10


def test_latents_per_channel_normalization_round_trip_and_decoding(encoded, vae_dir):
    """latent_mean / latent_std: x = (z − μ)/σ per channel on the unscaled stored latents, inverted
    exactly before the VAE (decoded samples = the VAE decode of the un-normalized latents)."""
    raw = torch.from_numpy(
        np.concatenate([np.load(encoded / f"shard_0000{i}.npz")["latents"] for i in range(3)])
    ).float()
    mean, std = [0.5, -0.25, 0.125, 0.75], [1.5, 2.0, 0.8, 1.25]
    ds = DATASETS.build("latents", root=str(encoded), num_classes=3, vae=str(vae_dir), latent_mean=mean, latent_std=std)
    m, s = torch.tensor(mean).reshape(1, 4, 1, 1), torch.tensor(std).reshape(1, 4, 1, 1)
    x, _ = ds.get(torch.arange(10))
    torch.testing.assert_close(x, (raw - m) / s)
    torch.testing.assert_close(ds.denormalize(ds.normalize(raw)), raw, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ds.denormalize(x), raw, rtol=1e-6, atol=1e-6)
    images = ds.decode(x[:3])
    want = load_vae(str(vae_dir)).decode(raw[:3])
    assert torch.allclose(images, want, atol=1e-5)
    assert "per-channel mean" in ds.describe_decoder()
    # The single scale stays the default and round-trips too.
    plain = DATASETS.build("latents", root=str(encoded), num_classes=3)
    torch.testing.assert_close(plain.denormalize(plain.normalize(raw)), raw)
    for kwargs, pattern in [
        ({"scale": 0.2, "latent_mean": mean, "latent_std": std}, "either scale or latent_mean"),
        ({"latent_mean": mean}, "go together"),
        ({"latent_mean": mean[:3], "latent_std": std[:3]}, "one value per channel"),
        ({"latent_mean": mean, "latent_std": [1.0, 0.0, 1.0, 1.0]}, "must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            DATASETS.build("latents", root=str(encoded), num_classes=3, **kwargs)


def test_latents_mmap_equals_in_memory_and_compressed(encoded, tmp_path):
    """Memory-mapped rows equal the arrays np.load reads, in any order and across shard borders,
    with flips and limits; compressed shards (not mappable) are read into memory instead."""
    mapped = DATASETS.build("latents", root=str(encoded), num_classes=3)
    loaded = DATASETS.build("latents", root=str(encoded), num_classes=3, mmap=False)
    assert mapped.rows.mapped and not loaded.rows.mapped
    order = torch.tensor([19, 0, 7, 7, 3, 12, 4, 10, 9])  # unsorted, repeated, both halves
    (xm, ym), (xl, yl) = mapped.get(order), loaded.get(order)
    assert torch.equal(xm, xl) and torch.equal(ym, yl)
    raw = [np.load(encoded / f"shard_0000{i}.npz") for i in range(3)]
    want = np.concatenate([f["latents"] for f in raw] + [f["latents_flip"] for f in raw])
    assert torch.equal(xm, torch.from_numpy(want[order.numpy()]).float() * SD_VAE_SCALE)
    # limit=5 stops inside a shard: 5 images, then their 5 flips.
    five = DATASETS.build("latents", root=str(encoded), num_classes=3, limit=5)
    x5, y5 = five.get(torch.arange(10))
    flat = np.concatenate([f["latents"] for f in raw])
    flat_flip = np.concatenate([f["latents_flip"] for f in raw])
    assert torch.equal(x5, torch.from_numpy(np.concatenate([flat[:5], flat_flip[:5]])).float() * SD_VAE_SCALE)
    assert y5.tolist() == [0, 0, 0, 0, 1] * 2
    with pytest.raises(IndexError, match="out of range"):
        five.get(torch.tensor([10]))
    # np.savez_compressed shards cannot be mapped: same values, read into memory.
    packed = tmp_path / "packed"
    packed.mkdir()
    for i, f in enumerate(raw):
        np.savez_compressed(packed / f"shard_{i}.npz", **{k: f[k] for k in f.files})
    comp = DATASETS.build("latents", root=str(packed), num_classes=3)
    assert not comp.rows.mapped and torch.equal(comp.get(order)[0], xm)


# ------------------------------------------------------------------------------ train / sample / eval


def test_train_sample_eval_on_decoded_latents(encoded, vae_dir, folder, tmp_path, capsys):
    recipe = tmp_path / "latents.yaml"
    recipe.write_text(
        f"data: {{name: latents, root: {encoded}, num_classes: 3, vae: {vae_dir}}}\n"
        "backbone: {name: test_dit}\n"
        "objective: {name: meanflow}\n"
        "train: {steps: 3, batch_size: 8, lr: 0.001, log_every: 1, num_preview: 6, sample_every: 3}\n"
        "eval: {num_samples: 20, batch_size: 10}\n"
    )
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress"]) == 0
    # The training preview shows the VAE-decoded 1-NFE samples of the EMA model from its fixed noise.
    from PIL import Image

    from onestep.formats import load_run
    from onestep.sampling import balanced_labels, sample, seeded_noise
    from onestep.viz import save_samples_png

    loaded = load_run(str(run), use_ema=True, device="cpu")
    x = sample(loaded.objective, loaded.net, seeded_noise(range(6), (4, 8, 8)), balanced_labels(range(6), 3), nfe=1)
    want = save_samples_png(loaded.dataset.decode(x), "image", tmp_path / "want.png", ncol=3)
    preview = run / "samples" / "step_000000003_nfe1.png"
    got, want = np.asarray(Image.open(preview)).astype(int), np.asarray(Image.open(want)).astype(int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1
    raw = np.asarray(Image.open(save_samples_png(x, "latent", tmp_path / "raw.png", ncol=3))).astype(int)
    assert raw.shape != got.shape or np.abs(got - raw).max() > 10  # not the raw-latent picture

    # Samples: decoded images by default, raw latents with --latents.
    assert main(["sample", str(run), "-n", "20", "--out", str(tmp_path / "img.npz")]) == 0
    assert main(["sample", str(run), "-n", "20", "--latents", "--out", str(tmp_path / "lat.npz")]) == 0
    images, latents = np.load(tmp_path / "img.npz"), np.load(tmp_path / "lat.npz")
    assert images["arr_0"].shape == (20, RES, RES, 3) and images["arr_0"].dtype == np.uint8
    assert latents["arr_0"].shape == (20, 4, 8, 8) and latents["arr_0"].dtype == np.float32
    assert images["arr_1"].tolist() == latents["arr_1"].tolist() == [i % 3 for i in range(20)]
    ds = DATASETS.build("latents", root=str(encoded), num_classes=3, vae=str(vae_dir))
    redecoded = fidelity.to_uint8_rgb(ds.decode(torch.from_numpy(latents["arr_0"]))).permute(0, 2, 3, 1).numpy()
    assert np.abs(redecoded.astype(int) - images["arr_0"]).max() <= 1
    assert main(["sample", str(run), "-n", "6", "--out", str(tmp_path / "img.png")]) == 0
    assert main(["sample", str(run), "-n", "6", "--latents", "--out", str(tmp_path / "lat.png")]) == 0
    # 3 columns (classes) x 2 rows of 16 px images, upscaled 4x; raw 8 px latents upscaled 8x.
    assert Image.open(tmp_path / "img.png").size == (4 * (3 * 17 + 1), 4 * (2 * 17 + 1))
    assert Image.open(tmp_path / "lat.png").size == (8 * (3 * 9 + 1), 8 * (2 * 9 + 1))

    # FID of the decoded samples against the class folder (ADM-cropped to 16 px), streamed.
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(run),
                "--metrics",
                "fid",
                "--reference",
                str(folder),
                "--feature-extractor",
                RC,
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["metric"] == "fid" and row["num_samples"] == 20 and row["step"] == 3
    assert "decoded by VAE" in row["implementation"] and RC in row["implementation"]
    assert str(folder) in row["reference"] and f"center crop to {RES}px" in row["reference"]
    reference = ImageFiles(image_files(folder), RES)
    direct = fidelity.fidelity_metrics(
        torch.from_numpy(images["arr_0"]).permute(0, 3, 1, 2),
        None,
        reference,
        ("fid",),
        feature_extractor=RC,
        device="cpu",
    )["fid"]
    assert row["value"] > 0 and row["value"] == pytest.approx(direct, rel=1e-4)

    # The same through FID statistics from tools/fid_stats.py (folder, ADM crop) and an ADM-style
    # reference batch (.npz of arr_0 images plus mu/sigma).
    stats = fid_stats_tool.main(
        [
            str(folder),
            "--resolution",
            str(RES),
            "--feature-extractor",
            RC,
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "ref_stats.npz"),
        ]
    )
    crops = np.stack([reference[i].permute(1, 2, 0).numpy() for i in range(len(reference))])
    np.savez(tmp_path / "VIRTUAL_tiny.npz", arr_0=crops)
    batch_stats = fid_stats_tool.main(
        [
            str(tmp_path / "VIRTUAL_tiny.npz"),
            "--feature-extractor",
            RC,
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "batch_stats.npz"),
        ]
    )
    mu, sigma = np.load(stats)["mu"], np.load(stats)["sigma"]
    assert np.allclose(np.load(batch_stats)["mu"], mu, atol=1e-6)
    np.savez(tmp_path / "adm_batch.npz", arr_0=crops, mu=mu, sigma=sigma)
    for ref in (stats, tmp_path / "adm_batch.npz"):
        assert (
            main(
                [
                    "eval",
                    str(run),
                    "--metrics",
                    "fid",
                    "--reference",
                    str(ref),
                    "--feature-extractor",
                    RC,
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert row["value"] == pytest.approx(direct, rel=1e-4) and "FID statistics" in row["reference"]
    # ADM's own statistics are 2048-d Inception features: refused with another extractor.
    np.savez(tmp_path / "adm_2048.npz", arr_0=crops[:2], mu=np.zeros(2048), sigma=np.eye(2048))
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(run),
                "--metrics",
                "fid",
                "--reference",
                str(tmp_path / "adm_2048.npz"),
                "--feature-extractor",
                RC,
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "2048-d" in capsys.readouterr().err

    # Default metrics of a decoded latent run: fid + isc; without a reference FID is a clear error.
    assert main(["eval", str(run), "--reference", str(stats), "--feature-extractor", RC, "--device", "cpu"]) == 0
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()[-2:]]
    assert [r["metric"] for r in rows] == ["fid", "isc"] and rows[1]["reference"].startswith("none")
    assert rows[0]["value"] == pytest.approx(direct, rel=1e-4) and rows[1]["value"] >= 0.999
    capsys.readouterr()
    assert main(["eval", str(run), "--metrics", "fid", "--feature-extractor", RC, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--reference" in err and "eval.reference" in err and len(err.splitlines()) == 1
    # Metrics of the latents themselves need no VAE decoding and no reference.
    assert main(["eval", str(run), "--metrics", "sliced_wasserstein", "--device", "cpu"]) == 0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["metric"] == "sliced_wasserstein" and "decoded" not in row["implementation"]


def test_image_metrics_need_a_vae_and_periodic_fid_needs_a_reference(encoded, vae_dir, tmp_path):
    from onestep.config import load_config
    from onestep.eval.evaluate import evaluate_model
    from onestep.registry import BACKBONES, OBJECTIVES

    plain = DATASETS.build("latents", root=str(encoded), num_classes=3)
    net, objective = BACKBONES.build("test_dit", num_classes=3), OBJECTIVES.build("meanflow")
    with pytest.raises(ConfigError, match="set data.vae"):
        evaluate_model(
            objective,
            net,
            plain,
            nfes=[1],
            metrics=["fid"],
            num_samples=4,
            seed=0,
            batch_size=4,
            device="cpu",
            step=0,
            weights="ema",
            reference=str(tmp_path),
            feature_extractor=RC,
        )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data: {{name: latents, root: {encoded}, num_classes: 3, vae: {vae_dir}}}\n"
        "backbone: {name: test_dit}\nobjective: {name: meanflow}\neval: {every: 10}\n"
    )
    with pytest.raises(ConfigError, match="eval.reference"):
        load_config(str(recipe))
    assert load_config(str(recipe), ["eval.reference=/data/ref.npz"]).eval.reference == "/data/ref.npz"
    assert load_config(str(recipe), ["eval.metrics=[isc]"]).eval.every == 10


def test_preview_falls_back_to_raw_latents_when_the_vae_does_not_load(encoded, tmp_path, capsys):
    recipe = tmp_path / "latents.yaml"
    recipe.write_text(
        f"data: {{name: latents, root: {encoded}, num_classes: 3, vae: {tmp_path / 'no-such-vae'}}}\n"
        "backbone: {name: test_dit}\n"
        "objective: {name: flow_matching}\n"
        "train: {steps: 2, batch_size: 4, log_every: 1, num_preview: 4, sample_every: 1}\n"
    )
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("previews stay raw latents") == 1 and "no-such-vae" in err  # warned once
    assert len(list((run / "samples").glob("*.png"))) == 2
