"""Write FID reference statistics (mu, sigma as .npz) of a dataset, an image folder or an .npz of images.

    python tools/fid_stats.py digits                                  # onestep dataset, Inception
    python tools/fid_stats.py digits --set image_size=32 --set split=train
    python tools/fid_stats.py /data/cifar10_png --out cifar10_train.npz
    python tools/fid_stats.py cifar10-train --feature-extractor inception-v3-compat --device cuda
    python tools/fid_stats.py digits --feature-extractor onestep-random-conv   # no download (tests)
    python tools/fid_stats.py /data/imagenet/train --resolution 256 --device cuda --out in256_train.npz
    python tools/fid_stats.py VIRTUAL_imagenet256_labeled.npz --device cuda   # its arr_0 images

A folder is read recursively (ImageNet's class subfolders work); ``--resolution`` gives every image
ADM's center crop (BOX halving, BICUBIC resize, center square), as ``tools/encode_latents.py`` does.
An .npz is read as uint8 images ``arr_0`` (N, H, W, C): ADM's sample and reference batches, or
``onestep sample --out x.npz``. (ADM's reference batches also carry ADM's own mu/sigma over the whole
training set: pass such a file to ``onestep eval --reference`` directly to use those, with the
``inception-v3-compat`` extractor.)

The features come from torch-fidelity's own extraction code with the chosen extractor (Inception
weights: --weights or ONESTEP_INCEPTION_WEIGHTS for offline machines). The default output is
$ONESTEP_CACHE/fid_stats/onestep-<dataset>-<resolution>px-<extractor>.npz, the key that
``onestep.eval.fidelity.default_stats_path`` gives, so eval can find statistics by dataset +
resolution + extractor. Pass the file as ``reference=`` to ``fidelity_metrics`` (FID only).
The .npz holds mu (D,), sigma (D, D) float64 and metadata: num_images, resolution,
feature_extractor, feature_layer, reference, weights, torch_fidelity_version.
Prints the output path as its last line.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import yaml


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "reference",
        help="image folder, .npz of arr_0 images, onestep image dataset name, or torch-fidelity dataset name",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="folders: ADM center crop of every image to this size (default: as read)",
    )
    parser.add_argument("--out", help="output .npz (default: the cache key under $ONESTEP_CACHE/fid_stats)")
    parser.add_argument("--feature-extractor", default="inception-v3-compat")
    parser.add_argument("--weights", default=None, help="local feature-extractor weights file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="kwargs of a onestep dataset factory (repeatable), e.g. image_size=32",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from onestep.eval import fidelity
    from onestep.registry import DATASETS, ConfigError

    try:
        reference = args.reference
        name = os.path.basename(os.path.normpath(reference)).removesuffix(".npz")
        kwargs = _parse_set(args.set)
        if not os.path.isdir(reference) and reference in DATASETS:
            dataset = DATASETS.build(reference, **kwargs)
            reference, name = dataset, dataset.name
        elif kwargs:
            raise ConfigError(f"--set applies to onestep datasets only, not {args.reference!r}")
        stats = fidelity.reference_statistics(
            reference,
            feature_extractor=args.feature_extractor,
            weights_path=args.weights,
            batch_size=args.batch_size,
            device=args.device,
            resolution=args.resolution,
            verbose=args.verbose,
        )
        out = args.out or fidelity.default_stats_path(name, stats["resolution"], args.feature_extractor, args.weights)
        path = fidelity.save_stats_npz(stats, out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"{stats['num_images']} images, {stats['resolution']}px, {stats['feature_extractor']} "
        f"layer {stats['feature_layer']} ({len(stats['mu'])}-d)",
        file=sys.stderr,
    )
    print(path)
    return str(path)


if __name__ == "__main__":
    main()
