"""References for torch-fidelity metrics: folders, image tensors and datasets, ``.npz`` image batches
and FID statistics (``tools/fid_stats.py`` files, ADM reference batches), and their cache names.

A folder is read recursively (ImageNet-style class subfolders work) and, with a resolution, every
image gets ADM's center crop to the samples' size; an ``.npz`` with ``arr_0`` gives uint8 images
(N, H, W, C) (ADM's layout); an ``.npz`` with ``mu``/``sigma`` gives FID statistics (TF-Inception
pool_3 for ADM's batches, which only ``inception-v3-compat`` matches).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from onestep.eval.fidelity.extractors import (
    DEFAULT_EXTRACTOR,
    _raised_byload_torch_fidelity,
    default_device,
    device_context,
    feature_layer,
    load_torch_fidelity,
    tf_version,
)
from onestep.eval.fidelity.images import ImageTensorDataset
from onestep.eval.fidelity.weights import resolve_weights, weights_tag
from onestep.registry import DATASETS, ConfigError
from onestep.utils.cache import cache_dir
from onestep.utils.npz import open_npz


def reference_cache_name(dataset: str, resolution: int) -> str:
    """torch-fidelity cache key of a reference: ``onestep-<dataset>-<resolution>px``. torch-fidelity
    appends the extractor and feature layer to its file names
    (``<key>-<extractor>-stat-fid-<layer>.pt``); ``fidelity_metrics`` appends ``-w<hash>`` for
    custom weights files."""
    return f"onestep-{dataset}-{resolution}px".replace(os.sep, "_")


def default_stats_path(
    dataset: str, resolution: int, feature_extractor: str = DEFAULT_EXTRACTOR, weights_path: str | None = None
) -> Path:
    """Where ``tools/fid_stats.py`` writes statistics by default:
    ``$ONESTEP_CACHE/fid_stats/onestep-<dataset>-<resolution>px-<extractor>[-w<hash>].npz``."""
    tag = weights_tag(weights_path) if weights_path else ""
    return cache_dir() / "fid_stats" / f"{reference_cache_name(dataset, resolution)}-{feature_extractor}{tag}.npz"


def _onestep_dataset_images(dataset) -> tuple[Tensor, str]:
    if getattr(dataset, "kind", None) != "image" or dataset.size is None:
        raise ConfigError(f"reference dataset '{getattr(dataset, 'name', dataset)}' is not a finite image dataset")
    x, _ = dataset.get(torch.arange(dataset.size))
    return x, dataset.name


def is_npz(reference: Any) -> bool:
    return isinstance(reference, (str, Path)) and str(reference).endswith(".npz")


def npz_arrays(path: str | Path) -> list[str]:
    """The array names in an .npz (read from its index, no data loaded); a one-line error if unreadable."""
    with open_npz(path, "reference") as f:
        return list(f.files)


def npz_images(path: str | Path) -> Tensor:
    """``arr_0`` of an .npz as uint8 (N, 3, H, W): ADM's sample / reference batch layout is uint8
    (N, H, W, C) (what ``onestep sample --out x.npz`` writes); (N, C, H, W) is accepted too."""
    with open_npz(path, "reference") as f:
        if "arr_0" not in f.files:
            raise ConfigError(f"reference {path}: no images (arr_0) in it; it has {', '.join(f.files)}")
        arr = f["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ConfigError(f"reference {path}: arr_0 must be uint8 images (N, H, W, C), got {arr.dtype} {arr.shape}")
    x = torch.from_numpy(arr)
    return x if arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3) else x.permute(0, 3, 1, 2)


def resolve_reference(reference: Any, resolution: int | None = None) -> tuple[Any, str | None, str]:
    """(torch-fidelity input, default cache name or None, description) for a reference of images.

    A folder is read recursively (ImageNet-style class subfolders work) and, with ``resolution``,
    every image gets ADM's center crop to that size (``onestep.data.images.center_crop_resize``);
    an .npz gives its ``arr_0`` images."""
    from torch_fidelity.registry import DATASETS_REGISTRY

    if isinstance(reference, torch.utils.data.Dataset):
        return reference, None, f"dataset of {len(reference)} images"
    if isinstance(reference, Tensor):
        return ImageTensorDataset(reference), None, f"{len(reference)} images {tuple(reference.shape[1:])}"
    if hasattr(reference, "kind") and hasattr(reference, "get"):  # a onestep Dataset
        x, name = _onestep_dataset_images(reference)
        return ImageTensorDataset(x), reference_cache_name(name, x.shape[-1]), f"{name}: {len(x)} images"
    if isinstance(reference, (str, Path)):
        ref = str(reference)
        if is_npz(ref):
            x = npz_images(ref)
            return ImageTensorDataset(x), None, f"{ref}: {len(x)} images (arr_0) at {x.shape[-1]}px"
        if ref in DATASETS_REGISTRY:
            return ref, ref, f"torch-fidelity dataset {ref}"
        if os.path.isdir(ref):
            from onestep.data.images import ImageFiles, image_files

            files = image_files(ref)
            if not files:
                raise ConfigError(f"reference folder {ref} holds no image files")
            crop = f", ADM center crop to {resolution}px" if resolution else ""
            return ImageFiles(files, resolution), None, f"folder {ref}: {len(files)} images{crop}"
        if ref in DATASETS:
            x, name = _onestep_dataset_images(DATASETS.build(ref))
            return ImageTensorDataset(x), reference_cache_name(name, x.shape[-1]), f"{name}: {len(x)} images"
        raise ConfigError(
            f"reference '{ref}' is neither a folder, an .npz (FID statistics or arr_0 images), a "
            f"torch-fidelity dataset ({', '.join(DATASETS_REGISTRY)}) nor a onestep dataset "
            f"({', '.join(DATASETS.names())})"
        )
    raise ConfigError(f"reference of type {type(reference).__name__} is not supported")


def uses_stats(reference: Any, metrics) -> bool:
    """True when ``reference`` is an .npz holding FID statistics (mu, sigma) and only FID is asked:
    ADM's reference batches hold both images and statistics, and FID uses the statistics (as ADM's
    evaluator does); KID / PRC need their images."""
    return is_npz(reference) and list(metrics) == ["fid"] and {"mu", "sigma"} <= set(npz_arrays(reference))


def describe_reference(reference: Any, metric: str = "fid", resolution: int | None = None) -> str:
    """A short description of a user-given reference, for metrics.jsonl rows (loads no images)."""
    if is_npz(reference):
        if uses_stats(reference, [metric]):
            with open_npz(reference, "reference") as f:
                extra = [f"{k} {f[k]}" for k in ("num_images", "feature_extractor", "reference") if k in f.files]
                if "arr_0" in f.files and not extra:
                    extra = ["mu/sigma of an ADM reference batch"]
            return f"FID statistics {os.path.abspath(reference)}" + (f" ({', '.join(extra)})" if extra else "")
        return f"images (arr_0) of {os.path.abspath(reference)}"
    if isinstance(reference, (str, Path)) and os.path.isdir(reference):
        return f"folder {os.path.abspath(reference)}" + (f", ADM center crop to {resolution}px" if resolution else "")
    return str(getattr(reference, "name", reference))


def load_stats_npz(path: str | Path) -> dict[str, Any]:
    """mu (D,), sigma (D, D) float64 and metadata from a ``tools/fid_stats.py`` file."""
    with open_npz(path, "FID statistics") as f:
        out = {k: f[k] for k in f.files if not k.startswith("arr_")}  # ADM reference batches: skip the images
    if "mu" not in out or "sigma" not in out:
        raise ConfigError(f"FID statistics {path}: needs arrays 'mu' and 'sigma', has {', '.join(out)}")
    out["mu"], out["sigma"] = out["mu"].astype(np.float64), out["sigma"].astype(np.float64)
    for key in ("feature_extractor", "feature_layer", "reference"):
        if key in out:
            out[key] = str(out[key])
    return out


def install_stats(path: str | Path, feature_extractor: str, feature_layer: str, cache_root: Path) -> str:
    """Put a .npz's (mu, sigma) into torch-fidelity's statistics cache; returns its cache name."""
    stats = load_stats_npz(path)
    for key, want in (("feature_extractor", feature_extractor), ("feature_layer", feature_layer)):
        if key in stats and stats[key] != want:
            raise ConfigError(f"FID statistics {path} were computed with {key} '{stats[key]}', not '{want}'")
    dim = stats["mu"].shape[0]
    if feature_layer.isdigit() and int(feature_layer) != dim or stats["sigma"].shape != (dim, dim):
        raise ConfigError(
            f"FID statistics {path} are {dim}-d (sigma {stats['sigma'].shape}); feature extractor "
            f"'{feature_extractor}' layer '{feature_layer}' gives {feature_layer}-d features"
        )
    digest = hashlib.sha1(stats["mu"].tobytes() + stats["sigma"].tobytes()).hexdigest()[:12]
    name = f"onestep-npz-{digest}"
    target = cache_root / f"{name}-{feature_extractor}-stat-fid-{feature_layer}.pt"
    if not target.exists():
        from torch_fidelity.utils_torch import torch_atomic_save

        cache_root.mkdir(parents=True, exist_ok=True)
        # torch-fidelity's own statistics: mu float32 (mean of float32 features), sigma float64 (np.cov).
        torch_atomic_save({"mu": stats["mu"].astype(np.float32), "sigma": stats["sigma"]}, str(target))
    return name


def reference_statistics(
    reference: Any,
    *,
    feature_extractor: str = DEFAULT_EXTRACTOR,
    weights_path: str | None = None,
    batch_size: int = 64,
    device=None,
    resolution: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """FID statistics of ``reference`` through torch-fidelity's feature extraction and
    ``fid_features_to_statistics``: {mu (D,), sigma (D, D) float64, num_images, resolution,
    feature_extractor, feature_layer, reference, weights, torch_fidelity_version}. A folder
    reference is ADM-center-cropped to ``resolution`` when given."""
    load_torch_fidelity()
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id, prepare_input_from_id

    cuda, device_ctx = device_context(device or default_device())
    weights = resolve_weights(feature_extractor, weights_path)
    layer = feature_layer(feature_extractor, "fid")
    input2, _, description = resolve_reference(reference, resolution)
    kwargs = dict(
        input2=input2,
        fid=True,
        feature_extractor=feature_extractor,
        feature_extractor_weights_path=weights,
        batch_size=batch_size,
        cuda=cuda,
        verbose=verbose,
        save_cpu_ram=True,
        datasets_download=False,
    )
    with device_ctx:
        try:
            first = prepare_input_from_id(2, **kwargs)[0]
            extractor = create_feature_extractor(feature_extractor, [layer], **kwargs)
            features = extract_featuresdict_from_input_id(2, extractor, **kwargs)[layer]
        except ValueError as exc:
            if not _raised_byload_torch_fidelity(exc):
                raise
            raise ConfigError(f"torch-fidelity: {exc}") from None
    stats = fid_features_to_statistics(features)
    return {
        "mu": stats["mu"].astype(np.float64),
        "sigma": stats["sigma"].astype(np.float64),
        "num_images": len(features),
        "resolution": int(first.shape[-1]),
        "feature_extractor": feature_extractor,
        "feature_layer": layer,
        "reference": description,
        "weights": "default" if weights is None else Path(weights).name,
        "torch_fidelity_version": tf_version(),
    }


def save_stats_npz(stats: dict[str, Any], path: str | Path) -> Path:
    """Write ``reference_statistics`` output as .npz (atomically; strings as 0-d unicode arrays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in stats.items()})
    os.replace(tmp, path)
    return path
