"""The torch-fidelity call: ``fidelity_metrics(generator_fn, num_samples, reference, metrics)``
runs ``torch_fidelity.calculate_metrics`` on samples generated in batches straight into it (no image
files), or on ready samples.

``generator_fn(index_batch (B,) int64) -> images (B, C, H, W)`` (or ``generator_fn(noise (B, z))``
when ``z_size`` is given); ``generator_fn`` may also be a ready tensor / Dataset of samples. Returns
``{"fid", "isc", "isc_std", "kid", "kid_std", "prc_precision", "prc_recall", "prc_f_score"}``
restricted to what was asked. Float images are taken as [-1, 1] and mapped with round((x + 1)·127.5)
(as ``onestep sample --out x.npz``); one channel is repeated to three.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from onestep.eval.fidelity.extractors import (
    DEFAULT_EXTRACTOR,
    _raised_byload_torch_fidelity,
    default_device,
    device_context,
    feature_layer,
    load_torch_fidelity,
)
from onestep.eval.fidelity.images import EmptyDataset, ImageTensorDataset, to_uint8_rgb
from onestep.eval.fidelity.references import install_stats, is_npz, npz_arrays, resolve_reference, uses_stats
from onestep.eval.fidelity.weights import resolve_weights, weights_tag
from onestep.registry import ConfigError
from onestep.utils.cache import cache_dir

RESULT_KEYS = {
    "frechet_inception_distance": "fid",
    "inception_score_mean": "isc",
    "inception_score_std": "isc_std",
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
    "precision": "prc_precision",
    "recall": "prc_recall",
    "f_score": "prc_f_score",
}


METRIC_NAMES = ("fid", "isc", "kid", "prc")


def _generator_model_class(tf):
    class GeneratorFnModel(tf.GenerativeModelBase):
        """A ``torch_fidelity.GenerativeModelBase`` around ``generator_fn``.

        Index mode (``z_size=None``): torch-fidelity's noise (B, 1) is ignored and
        ``generator_fn`` gets the sample indices (B,) int64, counting from 0 across batches, so
        sample i depends only on i (not on the batch size); reset ``offset`` before a run.
        Noise mode: ``generator_fn`` gets torch-fidelity's noise (B, z_size), drawn from its
        ``rng_seed`` (sequential draws, so also batch-size independent).
        """

        def __init__(self, generator_fn: Callable[[Tensor], Tensor], z_size: int | None = None):
            super().__init__()
            self.generator_fn = generator_fn
            self.index_mode = z_size is None
            self._z_size = 1 if z_size is None else int(z_size)
            self.offset = 0

        @property
        def z_size(self):
            return self._z_size

        @property
        def z_type(self):
            return "normal"

        @property
        def num_classes(self):
            return 0  # class choice, if any, is generator_fn's business (e.g. label = index % C)

        def forward(self, noise: Tensor) -> Tensor:
            if self.index_mode:
                batch = torch.arange(self.offset, self.offset + noise.shape[0], dtype=torch.int64)
                self.offset += noise.shape[0]
            else:
                batch = noise
            images = to_uint8_rgb(self.generator_fn(batch))
            if images.shape[0] != noise.shape[0]:
                raise ValueError(f"generator_fn returned {images.shape[0]} images for a batch of {noise.shape[0]}")
            return images.to(noise.device)

    return GeneratorFnModel


def fidelity_metrics(
    generator_fn: Callable[[Tensor], Tensor] | Tensor | torch.utils.data.Dataset,
    num_samples: int | None,
    reference: Any = None,
    metrics=("fid",),
    *,
    feature_extractor: str = DEFAULT_EXTRACTOR,
    weights_path: str | None = None,
    batch_size: int = 64,
    device=None,
    cache_name: str | None = None,
    z_size: int | None = None,
    seed: int = 2020,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    cache_root: str | Path | None = None,
    reference_resolution: int | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """Compute torch-fidelity ``metrics`` (subset of fid, isc, kid, prc) of generated images.

    generator_fn: ``f(indices (B,) int64) -> images (B, C, H, W)`` (uint8, or float in [-1, 1];
        C = 1 or 3), called on consecutive index batches 0..num_samples-1 of size ``batch_size``;
        with ``z_size`` it is called on torch-fidelity's N(0, I) noise (B, z_size) instead. May
        also be a ready tensor or Dataset of samples (``num_samples`` then ignored).
    reference: see the module docstring; not needed for ``isc`` alone.
    cache_name: torch-fidelity cache key for the reference's features/statistics (defaults to
        ``reference_cache_name`` for onestep datasets, the dataset name for torch-fidelity's own;
        None, i.e. no caching, for tensors and folders). A stale cache is not detected: pick a
        new name when the reference changes (e.g. a different subset).
    seed: torch-fidelity's ``rng_seed`` (noise mode, KID subsets, ISC split shuffling).
    kid_subset_size is clamped to the number of samples / reference images.
    reference_resolution: a folder reference is ADM-center-cropped to this size (the samples').
    Returns floats keyed fid, isc, isc_std, kid, kid_std, prc_precision, prc_recall, prc_f_score.
    """
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    bad = [m for m in metrics if m not in METRIC_NAMES]
    if bad or not metrics:
        raise ConfigError(
            f"unknown torch-fidelity metric(s) {', '.join(bad) or '(none)'}; allowed: {', '.join(METRIC_NAMES)}"
        )
    tf = load_torch_fidelity()
    cuda, device_ctx = device_context(device or default_device())
    weights = resolve_weights(feature_extractor, weights_path)
    cache_root = Path(cache_root) if cache_root is not None else cache_dir() / "fidelity_cache"

    kwargs: dict[str, Any] = dict(
        fid="fid" in metrics,
        isc="isc" in metrics,
        kid="kid" in metrics,
        prc="prc" in metrics,
        feature_extractor=feature_extractor,
        feature_extractor_weights_path=weights,
        batch_size=batch_size,
        cuda=cuda,
        rng_seed=seed,
        verbose=verbose,
        isc_splits=isc_splits,
        kid_subsets=kid_subsets,
        prc_neighborhood=prc_neighborhood,
        cache=True,
        cache_root=str(cache_root),
        save_cpu_ram=True,
        datasets_download=False,
    )

    # Input 1: a generative model (streamed in batches) or ready samples.
    if callable(generator_fn) and not isinstance(generator_fn, (Tensor, torch.utils.data.Dataset)):
        if not num_samples or num_samples < 1:
            raise ConfigError(f"fidelity metrics: num_samples must be >= 1, got {num_samples}")
        model = _generator_model_class(tf)(generator_fn, z_size)
        kwargs.update(input1=model, input1_model_num_samples=int(num_samples))
        n1 = int(num_samples)
    else:
        data = generator_fn if isinstance(generator_fn, torch.utils.data.Dataset) else ImageTensorDataset(generator_fn)
        kwargs.update(input1=data)
        n1 = len(data)

    # Input 2: the reference (not needed by isc alone).
    needs_reference = any(m in metrics for m in ("fid", "kid", "prc"))
    if needs_reference:
        if reference is None:
            raise ConfigError(f"fidelity metrics {', '.join(metrics)} need a reference")
        if is_npz(reference) and metrics != ["fid"] and "arr_0" not in npz_arrays(reference):
            raise ConfigError(f"a .npz of FID statistics ({reference}) serves 'fid' only, not {', '.join(metrics)}")
        if uses_stats(reference, metrics):
            layer = feature_layer(feature_extractor, "fid")
            name = install_stats(reference, feature_extractor, layer, cache_root)
            kwargs.update(input2=EmptyDataset(), input2_cache_name=name)
        else:
            input2, default_name, _ = resolve_reference(reference, reference_resolution)
            name = cache_name or default_name
            if name is not None and weights is not None:  # custom weights: keep their cache apart
                name += weights_tag(weights)
            # (torch-fidelity names the cache of its own registered datasets itself.)
            kwargs.update(input2=input2, input2_cache_name=name)
            if "kid" in metrics and not isinstance(input2, str):
                kwargs["kid_subset_size"] = max(2, min(kid_subset_size, n1, len(input2)))
    if "kid" in metrics and "kid_subset_size" not in kwargs:
        kwargs["kid_subset_size"] = max(2, min(kid_subset_size, n1))

    with device_ctx:
        try:
            raw = tf.calculate_metrics(**kwargs)
        except ValueError as exc:
            if not _raised_byload_torch_fidelity(exc):
                raise
            raise ConfigError(f"torch-fidelity: {exc}") from None  # its vassert: a one-line user error
    return {RESULT_KEYS[k]: float(v) for k, v in raw.items() if k in RESULT_KEYS}
