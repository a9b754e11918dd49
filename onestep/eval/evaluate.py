"""Score n-NFE samples of a model against its data: one row per (step, nfe, metric).

Samples come from ``onestep.eval.generate`` (per-sample seeds: the same samples at any batch size
or number of ranks). What each metric gets follows its declared needs (``onestep.eval.base``):
in-memory metrics score the samples in the data's own space (data coordinates, pixels, or latents)
against ``dataset.reference``; streaming metrics (torch-fidelity: fid, isc, kid, prc) get samples
batch by batch, VAE-decoded first for latent data with ``data.vae``, and a reference: ``reference=``
(a folder, an .npz of statistics or images, a dataset name; required for decoded latents) or else
the whole training set, whose statistics are cached by dataset + resolution + extractor.

Guidance-conditioned models (improved_meanflow) take the guidance scale ω and interval [t_min, t_max]
as network inputs: ``guidance`` (one ω or a list: a sweep, one set of rows per value) and
``guidance_interval``; every row records ``guidance`` (ω, or None when none was given: the model's
own ω = 1 on [0, 1]) and ``guidance_interval`` ([t_min, t_max] or None).
"""
from __future__ import annotations

import inspect
import time
from typing import Any

import torch

from onestep.eval import fidelity
from onestep.eval.base import Metric
from onestep.eval.generate import generate, model_generator_fn
from onestep.registry import METRICS, ConfigError
from onestep.sampling import with_guidance
from onestep.utils.distributed import broadcast_object, current

DEFAULT_METRICS = {"vector": ["sliced_wasserstein", "energy_distance"],
                   "image": ["fid", "isc"],
                   "latent": ["sliced_wasserstein"]}


def decodes_to_images(dataset) -> bool:
    """Latent data whose samples are decoded into images by a VAE (``data.vae``)."""
    return bool(getattr(dataset, "decodes_to_images", False))


def default_metrics(dataset) -> list[str]:
    """Per data kind; the bundled digits get the toolkit's own classifier metrics (no download);
    latents with a VAE get the image metrics (fid, isc) of their decoded samples."""
    if dataset.name == "digits":
        return ["digits_fd", "digits_is"] + (["digits_acc"] if dataset.num_classes else [])
    if dataset.name == "checkerboard":
        return DEFAULT_METRICS["vector"] + ["checkerboard_outside"]
    if decodes_to_images(dataset):
        return list(DEFAULT_METRICS["image"])
    return list(DEFAULT_METRICS.get(dataset.kind, ["sliced_wasserstein"]))


def metric_name(spec: str | dict[str, Any]) -> str:
    """The registered name of a metric spec: "fid" or {name: kid, subset_size: 100}."""
    return spec if isinstance(spec, str) else str(spec.get("name"))


def metric_options(spec: str | dict[str, Any]) -> dict[str, Any]:
    return {} if isinstance(spec, str) else {k: v for k, v in spec.items() if k != "name"}


def build_metric(spec: str | dict[str, Any], feature_extractor: str | None = None) -> Metric:
    """METRICS.build for a spec, with ``feature_extractor`` passed to metrics that take one (unless the
    spec sets its own)."""
    name, kwargs = metric_name(spec), metric_options(spec)
    if feature_extractor and "feature_extractor" not in kwargs and \
            "feature_extractor" in inspect.signature(METRICS.get(name)).parameters:
        kwargs["feature_extractor"] = feature_extractor
    return METRICS.build(name, **kwargs)


def _check_kind(metric: Metric, name: str, dataset, kind: str) -> None:
    if kind not in metric.kinds:
        hint = (": set data.vae (a Hugging Face id or a local AutoencoderKL directory) to score decoded images"
                if kind == "latent" and "image" in metric.kinds else "")
        raise ConfigError(f"metric '{name}' scores {' or '.join(metric.kinds)} data; the data '{dataset.name}' is "
                          f"{kind} data{hint}")


def evaluate_model(objective, net, dataset, *, nfes: list[int], metrics: list | None, num_samples: int,
                   seed: int, batch_size: int, device, step: int, weights: str,
                   reference_seed: int = 12345, reference: Any = None,
                   feature_extractor: str | None = None, guidance: float | list[float] | None = None,
                   guidance_interval: list[float] | tuple[float, float] | None = None) -> list[dict[str, Any]]:
    """Rows {step, nfe, metric, value, num_samples, implementation, reference, guidance, ...} for every
    guidance value, nfe and metric spec (a name or {name, **options}). ``reference``: what streaming
    metrics compare against instead of the training set (needed for decoded latents).
    ``feature_extractor`` replaces the default extractor of the metrics that take one (e.g. the
    download-free ``onestep-random-conv``). ``guidance``: ω (or a list of ω, a sweep): the network
    input of guidance-conditioned models, applied on ``guidance_interval`` (default [0, 1]), or the
    classifier-free guidance scale of models that guide when sampling (``sampling.with_guidance``)."""
    omegas = list(guidance) if isinstance(guidance, (list, tuple)) else [guidance]
    try:
        settings = [with_guidance(objective, net, w, guidance_interval if w is not None else None) for w in omegas]
    except ValueError as exc:
        raise ConfigError(f"guidance: {exc}") from None
    specs = list(metrics) if metrics else default_metrics(dataset)
    built = [(metric_name(s), build_metric(s, feature_extractor)) for s in specs]
    decoded_kind = "image" if decodes_to_images(dataset) else dataset.kind
    for name, metric in built:
        _check_kind(metric, name, dataset, decoded_kind if metric.streaming else dataset.kind)
    in_memory = [(n, m) for n, m in built if not m.streaming]
    data_reference = ref_desc = None
    if any(m.needs_reference for _, m in in_memory):
        data_reference, _ = dataset.reference(num_samples, seed=reference_seed)
        ref_desc = (f"{dataset.name}: {data_reference.shape[0]} fresh samples (seed {reference_seed})"
                    if dataset.size is None else
                    f"{dataset.name}: {data_reference.shape[0]} of {dataset.size} data samples")
    net.eval()
    rows = []
    for omega, (objective, cond), nfe in [(w, g, n) for w, g in zip(omegas, settings) for n in nfes]:
        grid = [round(v, 6) for v in objective.time_grid(nfe).tolist()]
        samples = labels = None
        gen_s = 0.0
        if in_memory:
            t0 = time.perf_counter()
            samples, labels = generate(objective, net, dataset, num_samples=num_samples, nfe=nfe, seed=seed,
                                       batch_size=batch_size, device=device, cond=cond)
            gen_s = time.perf_counter() - t0
        for name, metric in built:
            t0 = time.perf_counter()
            if metric.streaming:
                value, desc, impl = _streamed(metric, name, objective, net, dataset, nfe=nfe, seed=seed,
                                              num_samples=num_samples, device=device, reference=reference, cond=cond)
            else:
                value = float(metric(samples, data_reference if metric.needs_reference else None,
                                     labels if metric.needs_labels else None))
                desc = ref_desc if metric.needs_reference else "none (needs no reference)"
                impl = metric.implementation
            elapsed = time.perf_counter() - t0 + (0.0 if metric.streaming else gen_s)
            rows.append({
                "step": step, "nfe": nfe, "metric": name, "value": value,
                "num_samples": num_samples, "implementation": impl,
                "reference": desc, "higher_is_better": metric.higher_is_better,
                "grid": grid, "weights": weights, "seed": seed,
                "samples_per_s": round(num_samples / max(elapsed, 1e-9), 1),
                "guidance": None if omega is None else float(omega),
                "guidance_interval": None if cond is None else [cond["t_min"], cond["t_max"]],
            })
    return rows


def _streamed(metric: Metric, name: str, objective, net, dataset, *, nfe: int, seed: int, num_samples: int, device,
              reference: Any = None, cond: dict | None = None) -> tuple[float, str, str]:
    """Samples generated batch by batch straight into the metric (VAE-decoded first for latent data);
    the reference is ``reference`` or else the whole training set. Returns (value, reference,
    implementation)."""
    decoded = decodes_to_images(dataset)
    fn = model_generator_fn(objective, net, dataset, nfe=nfe, seed=seed, device=device,
                            transform=dataset.decode if decoded else None, cond=cond)
    implementation = metric.implementation
    if decoded:
        implementation += f"; {dataset.describe_decoder()}"
    res = int(dataset.image_shape[-1] if decoded else dataset.shape[-1])
    ref, cache_name, desc = None, None, "none (needs no reference)"
    if metric.needs_reference:
        if reference is not None:
            ref, desc = reference, fidelity.describe_reference(reference, metric.name, res)
        elif decoded:
            raise ConfigError(f"metric '{name}' on VAE-decoded latents needs reference images: pass --reference "
                              f"FOLDER|STATS.npz|DATASET to onestep eval (or set eval.reference), e.g. an ImageNet "
                              f"folder, statistics from tools/fid_stats.py, or ADM's VIRTUAL_imagenet256_labeled.npz")
        else:
            ref, cache_name = dataset, fidelity.reference_cache_name(dataset.name, res)
            desc = f"{dataset.name}: all {dataset.size} training images at {res}px"
    if current().is_main:
        value = metric.from_generator(fn, num_samples, ref, cache_name=cache_name, reference_resolution=res)
    else:
        # The metric runs on rank 0; the other ranks generate their share of the same batches (its
        # order: batch_size at a time from index 0), joining each all-gather.
        batch = min(metric.batch_size, num_samples)
        for start in range(0, num_samples, batch):
            fn(torch.arange(start, min(start + batch, num_samples)))
        value = None
    return float(broadcast_object(value)), desc, implementation
