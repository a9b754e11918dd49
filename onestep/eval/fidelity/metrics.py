"""The registered torch-fidelity metrics ``fid``, ``isc``, ``kid``, ``prc``: ``Metric`` objects that
stream a generator into torch-fidelity (``from_generator``) or score ready images (``__call__``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from onestep.eval.base import Metric
from onestep.eval.fidelity.extractors import DEFAULT_EXTRACTOR, tf_version
from onestep.eval.fidelity.weights import ENV_WEIGHTS
from onestep.eval.fidelity.wrapper import fidelity_metrics
from onestep.registry import METRICS, ConfigError


class FidelityMetric(Metric):
    """One torch-fidelity metric as a onestep ``Metric`` (images only).

    ``metric(samples, reference, labels=None)``: samples / reference as image tensors (float in
    [-1, 1] or uint8) or anything ``fidelity_metrics`` takes as a reference.
    ``metric.from_generator(generator_fn, num_samples, reference, cache_name=None)``: stream
    samples from ``generator_fn`` straight into torch-fidelity. ``last_results`` keeps every
    number of the last call (e.g. isc_std, prc_recall).
    """

    kinds = ("image",)
    streaming = True

    def __init__(
        self,
        metric: str,
        key: str,
        *,
        feature_extractor: str,
        weights_path: str | None,
        batch_size: int,
        device: str | None,
        options: dict[str, Any],
        higher_is_better: bool,
        describe: str,
    ):
        self.name, self.key = metric, key
        self.higher_is_better = higher_is_better
        self.needs_reference = metric != "isc"  # the Inception score looks at the samples alone
        self.feature_extractor, self.weights_path = feature_extractor, weights_path
        self.batch_size, self.device, self.options = batch_size, device, options
        self.last_results: dict[str, float] = {}
        weights = "" if weights_path is None else f", weights {Path(weights_path).name}"
        if feature_extractor == DEFAULT_EXTRACTOR and weights_path is None and os.environ.get(ENV_WEIGHTS):
            weights = f", weights {Path(os.environ[ENV_WEIGHTS]).name}"
        self.implementation = (
            f"torch-fidelity {tf_version()} {describe}, {feature_extractor}{weights}, uint8 round((x+1)*127.5)"
        )

    def _run(self, generator_fn, num_samples, reference, **extra) -> float:
        self.last_results = fidelity_metrics(
            generator_fn,
            num_samples,
            reference,
            (self.name,),
            feature_extractor=self.feature_extractor,
            weights_path=self.weights_path,
            batch_size=self.batch_size,
            device=self.device,
            **self.options,
            **extra,
        )
        return self.last_results[self.key]

    def __call__(self, samples, reference=None, labels=None) -> float:
        return self._run(samples, None, reference)

    def from_generator(
        self,
        generator_fn,
        num_samples: int,
        reference=None,
        *,
        cache_name: str | None = None,
        z_size: int | None = None,
        seed: int = 2020,
        reference_resolution: int | None = None,
    ) -> float:
        """Stream ``num_samples`` images of ``generator_fn`` (see ``fidelity_metrics``) into torch-fidelity."""
        return self._run(
            generator_fn,
            num_samples,
            reference,
            cache_name=cache_name,
            z_size=z_size,
            seed=seed,
            reference_resolution=reference_resolution,
        )


def _check_common(name: str, batch_size: int, device: str | None) -> None:
    if batch_size < 1:
        raise ConfigError(f"metric '{name}': key 'batch_size' must be >= 1, got {batch_size}")
    if device is not None and torch.device(device).type not in ("cpu", "cuda"):
        raise ConfigError(f"metric '{name}': key 'device' must be cpu or cuda, got {device!r}")


@METRICS.register("fid", tags=("image", "torch-fidelity"))
def fid(
    feature_extractor: str = DEFAULT_EXTRACTOR,
    weights_path: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
) -> FidelityMetric:
    """FID through torch-fidelity (lower is better); Inception by default, see ONESTEP_INCEPTION_WEIGHTS."""
    _check_common("fid", batch_size, device)
    return FidelityMetric(
        "fid",
        "fid",
        feature_extractor=feature_extractor,
        weights_path=weights_path,
        batch_size=batch_size,
        device=device,
        options={},
        higher_is_better=False,
        describe="FID (default feature layer)",
    )


@METRICS.register("isc", tags=("image", "torch-fidelity"))
def isc(
    feature_extractor: str = DEFAULT_EXTRACTOR,
    weights_path: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    splits: int = 10,
) -> FidelityMetric:
    """Inception score through torch-fidelity, mean over ``splits`` (higher is better)."""
    _check_common("isc", batch_size, device)
    if splits < 1:
        raise ConfigError(f"metric 'isc': key 'splits' must be >= 1, got {splits}")
    return FidelityMetric(
        "isc",
        "isc",
        feature_extractor=feature_extractor,
        weights_path=weights_path,
        batch_size=batch_size,
        device=device,
        options={"isc_splits": splits},
        higher_is_better=True,
        describe=f"IS ({splits} splits)",
    )


@METRICS.register("kid", tags=("image", "torch-fidelity"))
def kid(
    feature_extractor: str = DEFAULT_EXTRACTOR,
    weights_path: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    subset_size: int = 1000,
    subsets: int = 100,
) -> FidelityMetric:
    """KID through torch-fidelity, cubic polynomial kernel (lower is better).

    The subset size is clamped to the number of samples and reference images."""
    _check_common("kid", batch_size, device)
    if subset_size < 2 or subsets < 1:
        raise ConfigError(f"metric 'kid': needs subset_size >= 2 and subsets >= 1, got {subset_size}, {subsets}")
    return FidelityMetric(
        "kid",
        "kid",
        feature_extractor=feature_extractor,
        weights_path=weights_path,
        batch_size=batch_size,
        device=device,
        options={"kid_subset_size": subset_size, "kid_subsets": subsets},
        higher_is_better=False,
        describe=f"KID (poly3, {subsets} subsets of min({subset_size}, N))",
    )


@METRICS.register("prc", tags=("image", "torch-fidelity"))
def prc(
    feature_extractor: str = "vgg16",
    weights_path: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    neighborhood: int = 3,
    component: Literal["precision", "recall", "f_score"] = "f_score",
) -> FidelityMetric:
    """Precision/recall/F-score through torch-fidelity, VGG16 features by default (higher is better).

    Reports ``component`` (Kynkaanniemi et al. 2019, k = ``neighborhood``); all three are in
    ``last_results``."""
    _check_common("prc", batch_size, device)
    if neighborhood < 1:
        raise ConfigError(f"metric 'prc': key 'neighborhood' must be >= 1, got {neighborhood}")
    return FidelityMetric(
        "prc",
        f"prc_{component}",
        feature_extractor=feature_extractor,
        weights_path=weights_path,
        batch_size=batch_size,
        device=device,
        options={"prc_neighborhood": neighborhood},
        higher_is_better=True,
        describe=f"PRC {component} (k={neighborhood})",
    )
