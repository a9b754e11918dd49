"""Encode an ImageNet-style image folder into SD-VAE latent shards for the ``latents`` dataset.

    python tools/encode_latents.py /data/imagenet/train /data/in256_latents --flip
    torchrun --nproc_per_node=8 tools/encode_latents.py /data/imagenet/train /data/in256_latents --flip

SRC is ROOT/CLASS/**/*.JPEG|png|...: the classes are the sorted subfolder names, label = index
(written to OUT/classes.json). Each image is converted to RGB and center-cropped as in ADM
(guided-diffusion): halve with a BOX filter while the short side >= 2·resolution, resize with
BICUBIC so the short side is the resolution, crop the center square. The VAE (diffusers
AutoencoderKL, a Hugging Face id or a local directory; ``pip install 'onestep[vae]'``) encodes the
images in [-1, 1] to the posterior mean, stored unscaled (the dataset applies the 0.18215 scale).

OUT/shard_00000.npz, ... hold ``latents`` (N, C, R/8, R/8) in --dtype, ``labels`` (N,) int64 and,
with --flip, ``latents_flip``: the latents of the horizontally flipped images, same rows (the
``latents`` dataset uses them as extra examples unless ``data.flip=false``). Shard i holds images
[i·S, (i+1)·S) of the sorted file list.

Resumable: a shard is written to a hidden temporary file and renamed, so a shard that exists is
complete and a rerun skips it; OUT/encode_latents.json records the settings and the file list's
hash and a rerun with different ones is refused. Multi-GPU: under torchrun (RANK, WORLD_SIZE,
LOCAL_RANK) rank r encodes shards r, r+W, r+2W, ... on cuda:LOCAL_RANK; no collective is needed,
and any rank count can finish what another left. Prints progress and images/s; the last line is OUT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

META_FILE = "encode_latents.json"
CLASSES_FILE = "classes.json"
STORAGE = {"fp16": np.float16, "fp32": np.float32}


def shard_path(out: Path, index: int) -> Path:
    return out / f"shard_{index:05d}.npz"


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Uncompressed .npz (as np.savez) with fixed zip timestamps, so equal arrays give equal bytes;
    written to a hidden temporary file, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(value), allow_pickle=False)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise SystemExit(f"error: RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def check_meta(out: Path, meta: dict) -> None:
    """Refuse to mix shards made with other settings or from another file list."""
    path = out / META_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in meta if old.get(k) != meta[k]]
        if diff:
            raise SystemExit(
                "error: "
                + f"{out} holds shards made with other settings "
                + f"({', '.join(f'{k}: {old.get(k)!r} -> {meta[k]!r}' for k in diff)}); "
                f"use a new OUT folder or delete {out}"
            )
    else:
        write_json(path, meta)


def encode_shard(
    vae, files: list[Path], labels: list[int], *, resolution: int, flip: bool, batch_size: int, workers: int, dtype
) -> dict[str, np.ndarray]:
    from onestep.data.images import ImageFiles, uint8_to_unit

    loader = torch.utils.data.DataLoader(ImageFiles(files, resolution), batch_size=batch_size, num_workers=workers)
    latents, flipped = [], []
    for batch in loader:
        x = uint8_to_unit(batch).to(vae.device)
        z = vae.encode(torch.cat([x, x.flip(-1)]) if flip else x).cpu()
        latents.append(z[: len(x)])
        flipped.append(z[len(x) :])
    arrays = {"latents": torch.cat(latents).numpy().astype(dtype), "labels": np.asarray(labels, dtype=np.int64)}
    if flip:
        arrays["latents_flip"] = torch.cat(flipped).numpy().astype(dtype)
    return arrays


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="ImageNet-style folder: SRC/CLASS/**/image files")
    parser.add_argument("out", help="output folder of shard_*.npz (created)")
    parser.add_argument("--resolution", type=int, default=256, help="ADM center crop size (default 256)")
    parser.add_argument("--flip", action="store_true", help="also store the latents of the flipped images")
    parser.add_argument(
        "--vae",
        default=None,
        help="Hugging Face id or local AutoencoderKL directory (default stabilityai/sd-vae-ft-mse)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per VAE call")
    parser.add_argument("--shard-size", type=int, default=10000, help="images per shard")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:N")
    parser.add_argument("--dtype", choices=sorted(STORAGE), default="fp16", help="storage dtype of the latents")
    parser.add_argument("--workers", type=int, default=4, help="image-decoding worker processes (0: in-process)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from onestep.data.images import class_folders
    from onestep.data.vae import DEFAULT_VAE, load_vae
    from onestep.registry import ConfigError
    from onestep.utils.device import pick_device

    if args.resolution < 1 or args.batch_size < 1 or args.shard_size < 1 or args.workers < 0:
        raise SystemExit("error: --resolution, --batch-size and --shard-size must be >= 1, --workers >= 0")
    rank, world, local_rank = dist_env()
    vae_name = args.vae or DEFAULT_VAE
    src, out = Path(args.src).expanduser(), Path(args.out).expanduser()
    try:
        files, labels, classes = class_folders(src, "encode_latents")
        device = pick_device(args.device, local_rank)
        vae = load_vae(vae_name, device=device, batch_size=args.batch_size)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.resolution % vae.downsample:
        raise SystemExit(
            f"error: --resolution {args.resolution} is not a multiple of the VAE's downsampling factor {vae.downsample}"
        )
    listing = hashlib.sha1("\n".join(f"{p.relative_to(src)}\t{y}" for p, y in zip(files, labels)).encode())
    num_shards = (len(files) + args.shard_size - 1) // args.shard_size
    meta = {
        "format": 1,
        "num_images": len(files),
        "num_classes": len(classes),
        "files_sha1": listing.hexdigest(),
        "resolution": args.resolution,
        "flip": args.flip,
        "vae": vae_name,
        "dtype": args.dtype,
        "shard_size": args.shard_size,
        "num_shards": num_shards,
        "latent_shape": [vae.latent_channels] + [args.resolution // vae.downsample] * 2,
    }
    out.mkdir(parents=True, exist_ok=True)
    check_meta(out, meta)
    write_json(out / CLASSES_FILE, classes)

    mine = list(range(rank, num_shards, world))
    todo = [i for i in mine if not shard_path(out, i).exists()]
    print(
        f"rank {rank}/{world} on {device}: {len(files)} images, {len(classes)} classes, {num_shards} shards; "
        f"this rank: {len(mine)} shards, {len(mine) - len(todo)} already done",
        file=sys.stderr,
        flush=True,
    )
    started, encoded = time.perf_counter(), 0
    for done, i in enumerate(todo, 1):
        start, end = i * args.shard_size, min((i + 1) * args.shard_size, len(files))
        t0 = time.perf_counter()
        arrays = encode_shard(
            vae,
            files[start:end],
            labels[start:end],
            resolution=args.resolution,
            flip=args.flip,
            batch_size=args.batch_size,
            workers=args.workers,
            dtype=STORAGE[args.dtype],
        )
        write_npz(shard_path(out, i), arrays)
        encoded += end - start
        elapsed = time.perf_counter() - started
        rate = encoded / max(elapsed, 1e-9)
        left = sum(min((j + 1) * args.shard_size, len(files)) - j * args.shard_size for j in todo[done:])
        print(
            f"rank {rank}: shard {i} ({end - start} images{' + flips' if args.flip else ''}) in "
            f"{time.perf_counter() - t0:.1f} s; {done}/{len(todo)} done, {rate:.1f} images/s, "
            f"~{left / max(rate, 1e-9) / 60:.1f} min left",
            file=sys.stderr,
            flush=True,
        )
    print(out)
    return str(out)


if __name__ == "__main__":
    main()
