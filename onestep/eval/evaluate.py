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
from onestep.eval.classifiers import family_of
from onestep.eval.generate import generate, model_generator_fn
from onestep.registry import METRICS, ConfigError
from onestep.sampling import with_guidance
from onestep.utils.distributed import broadcast_object, current

DEFAULT_METRICS = {
    "vector": ["sliced_wasserstein", "energy_distance"],
    "image": ["fid", "isc"],
    "latent": ["sliced_wasserstein"],
}


def decodes_to_images(dataset) -> bool:
    """Latent data whose samples are decoded into images by a VAE (``data.vae``)."""
    return bool(getattr(dataset, "decodes_to_images", False))


def default_metrics(dataset) -> list[str]:
    """Per data kind; labeled image sets with a reference classifier (digits, fashion_mnist, mnist)
    get the toolkit's own classifier metrics (no download); latents with a VAE get the image metrics
    (fid, isc) of their decoded samples."""
    if family_of(dataset):
        return ["fd", "is"] + (["acc"] if dataset.num_classes else []) + ["precision", "recall"]
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


def build_metric(spec: str | dict[str, Any], feature_extractor: str | None = None, dataset=None) -> Metric:
    """METRICS.build for a spec, with ``feature_extractor`` passed to metrics that take one, and the
    reference classifier of ``dataset``'s family to metrics that take a ``classifier`` (unless the spec
    sets its own); such metrics also get ``dataset`` (where the classifier's training data lives)."""
    name, kwargs = metric_name(spec), metric_options(spec)
    params = inspect.signature(METRICS.get(name)).parameters
    if feature_extractor and "feature_extractor" not in kwargs and "feature_extractor" in params:
        kwargs["feature_extractor"] = feature_extractor
    family = family_of(dataset) if dataset is not None else None
    if family and "classifier" not in kwargs and "classifier" in params:
        kwargs["classifier"] = family
    metric = METRICS.build(name, **kwargs)
    if dataset is not None and hasattr(metric, "dataset"):
        metric.dataset = dataset
    return metric


def split_reference(dataset, split: str) -> tuple[Any, str]:
    """(images, description) of the whole ``split`` of ``dataset``'s family, for metrics whose
    reference is a split (``Metric.reference_split``)."""
    if not hasattr(dataset, "load_split"):
        raise ConfigError(f"the data '{dataset.name}' has no '{split}' split to score against")
    ref = dataset.load_split(split, conditional=True)
    return ref.x, f"{dataset.family} {split} split: all {ref.size} images"


def _check_kind(metric: Metric, name: str, dataset, kind: str) -> None:
    if kind not in metric.kinds:
        hint = (
            ": set data.vae (a Hugging Face id or a local AutoencoderKL directory) to score decoded images"
            if kind == "latent" and "image" in metric.kinds
            else ""
        )
        raise ConfigError(
            f"metric '{name}' scores {' or '.join(metric.kinds)} data; the data '{dataset.name}' is {kind} data{hint}"
        )


def evaluate_model(
    objective,
    net,
    dataset,
    *,
    nfes: list[int],
    metrics: list | None,
    num_samples: int,
    seed: int,
    batch_size: int,
    device,
    step: int,
    weights: str,
    reference_seed: int = 12345,
    reference: Any = None,
    feature_extractor: str | None = None,
    guidance: float | list[float] | None = None,
    guidance_interval: list[float] | tuple[float, float] | None = None,
    sample_cache=None,
) -> list[dict[str, Any]]:
    """Rows {step, nfe, metric, value, num_samples, implementation, reference, guidance, ...} for every
    guidance value, nfe and metric spec (a name or {name, **options}). ``reference``: what streaming
    metrics compare against instead of the training set (needed for decoded latents).
    ``feature_extractor`` replaces the default extractor of the metrics that take one (e.g. the
    download-free ``onestep-random-conv``). ``guidance``: ω (or a list of ω, a sweep): the network
    input of guidance-conditioned models, applied on ``guidance_interval`` (default [0, 1]), or the
    classifier-free guidance scale of models that guide when sampling (``sampling.with_guidance``).
    ``sample_cache`` (``sample_cache.SampleCacheRoot``): keeps each pass's generated batches so that
    a killed eval resumes; the caller clears it once the rows are written."""
    omegas = list(guidance) if isinstance(guidance, (list, tuple)) else [guidance]
    try:
        settings = [with_guidance(objective, net, w, guidance_interval if w is not None else None) for w in omegas]
    except ValueError as exc:
        raise ConfigError(f"guidance: {exc}") from None
    specs = list(metrics) if metrics else default_metrics(dataset)
    built = [(metric_name(s), build_metric(s, feature_extractor, dataset)) for s in specs]
    decoded_kind = "image" if decodes_to_images(dataset) else dataset.kind
    for name, metric in built:
        _check_kind(metric, name, dataset, decoded_kind if metric.streaming else dataset.kind)
    in_memory = [(n, m) for n, m in built if not m.streaming]
    references = _in_memory_references(dataset, in_memory, num_samples, reference_seed)
    net.eval()
    rows = []
    for omega, (objective, cond), nfe in [(w, g, n) for w, g in zip(omegas, settings) for n in nfes]:
        grid = [round(v, 6) for v in objective.time_grid(nfe).tolist()]
        samples = labels = None
        gen_s = 0.0
        if in_memory:
            t0 = time.perf_counter()
            samples, labels = generate(
                objective,
                net,
                dataset,
                num_samples=num_samples,
                nfe=nfe,
                seed=seed,
                batch_size=batch_size,
                device=device,
                cond=cond,
                cache=None
                if sample_cache is None
                else sample_cache.pass_cache(
                    objective=type(objective).__name__,
                    nfe=nfe,
                    grid=grid,
                    seed=seed,
                    guidance=omega,
                    cond=cond,
                    sampler=getattr(objective, "sampler", None),
                    data=[dataset.name, list(dataset.shape), dataset.num_classes],
                ),
            )
            gen_s = time.perf_counter() - t0
        for name, metric in built:
            t0 = time.perf_counter()
            if metric.streaming:
                value, desc, impl = _streamed(
                    metric,
                    name,
                    objective,
                    net,
                    dataset,
                    nfe=nfe,
                    seed=seed,
                    num_samples=num_samples,
                    device=device,
                    reference=reference,
                    cond=cond,
                )
            else:
                ref, desc = (
                    references.get(metric.reference_split, (None, None))
                    if metric.needs_reference
                    else (None, "none (needs no reference)")
                )
                value = float(metric(samples, ref, labels if metric.needs_labels else None))
                impl = metric.implementation
            elapsed = time.perf_counter() - t0 + (0.0 if metric.streaming else gen_s)
            rows.append(
                {
                    "step": step,
                    "nfe": nfe,
                    "metric": name,
                    "value": value,
                    "num_samples": num_samples,
                    "implementation": impl,
                    "reference": desc,
                    "higher_is_better": metric.higher_is_better,
                    "grid": grid,
                    "weights": weights,
                    "seed": seed,
                    "samples_per_s": round(num_samples / max(elapsed, 1e-9), 1),
                    "guidance": None if omega is None else float(omega),
                    "guidance_interval": None if cond is None else [cond["t_min"], cond["t_max"]],
                    **({"sampler": objective.sampler} if hasattr(objective, "sampler") else {}),
                }
            )
    return rows


def _in_memory_references(dataset, metrics, num_samples: int, reference_seed: int) -> dict:
    """{reference_split (None = the dataset's own samples): (reference, description)} for the
    in-memory metrics that need one."""
    out = {}
    for _, metric in metrics:
        split = metric.reference_split
        if not metric.needs_reference or split in out:
            continue
        if split is not None:
            out[split] = split_reference(dataset, split)
            continue
        ref, _ = dataset.reference(num_samples, seed=reference_seed)
        out[None] = (
            ref,
            f"{dataset.name}: {ref.shape[0]} fresh samples (seed {reference_seed})"
            if dataset.size is None
            else f"{dataset.name}: {ref.shape[0]} of {dataset.size} data samples",
        )
    return out


def evaluate_real(
    dataset, *, split: str, metrics: list | None, num_samples: int, seed: int, reference_seed: int = 12345
) -> list[dict[str, Any]]:
    """The floor: rows for ``num_samples`` real images of ``split`` (a seeded subset, with their true
    labels) scored by the in-memory metrics exactly as a model's samples are (``--reference real:SPLIT``)."""
    specs = list(metrics) if metrics else default_metrics(dataset)
    built = [(metric_name(s), build_metric(s, None, dataset)) for s in specs]
    for name, metric in built:
        if metric.streaming:
            raise ConfigError(
                f"--reference real:{split} scores real images with the in-memory metrics; "
                f"'{name}' is a streaming (torch-fidelity) metric"
            )
        _check_kind(metric, name, dataset, dataset.kind)
    real = dataset.load_split(split, conditional=True) if hasattr(dataset, "load_split") else dataset
    n = min(num_samples, real.size)
    index = torch.randperm(real.size, generator=torch.Generator().manual_seed(seed))[:n]
    samples, labels = real.get(index)
    if not dataset.num_classes:
        labels = None
    references = _in_memory_references(dataset, built, num_samples, reference_seed)
    rows = []
    for name, metric in built:
        ref, desc = (
            references.get(metric.reference_split, (None, None))
            if metric.needs_reference
            else (None, "none (needs no reference)")
        )
        value = float(metric(samples, ref, labels if metric.needs_labels else None))
        rows.append(
            {
                "step": None,
                "nfe": 0,
                "metric": name,
                "value": value,
                "num_samples": n,
                "implementation": metric.implementation,
                "reference": desc,
                "higher_is_better": metric.higher_is_better,
                "weights": f"real:{split}",
                "seed": seed,
            }
        )
    return rows


def _streamed(
    metric: Metric,
    name: str,
    objective,
    net,
    dataset,
    *,
    nfe: int,
    seed: int,
    num_samples: int,
    device,
    reference: Any = None,
    cond: dict | None = None,
) -> tuple[float, str, str]:
    """Samples generated batch by batch straight into the metric (VAE-decoded first for latent data);
    the reference is ``reference`` or else the whole training set. Returns (value, reference,
    implementation)."""
    decoded = decodes_to_images(dataset)
    fn = model_generator_fn(
        objective,
        net,
        dataset,
        nfe=nfe,
        seed=seed,
        device=device,
        transform=dataset.decode if decoded else None,
        cond=cond,
    )
    implementation = metric.implementation
    if decoded:
        implementation += f"; {dataset.describe_decoder()}"
    res = int(dataset.image_shape[-1] if decoded else dataset.shape[-1])
    ref, cache_name, desc = None, None, "none (needs no reference)"
    if metric.needs_reference:
        if reference is not None:
            ref, desc = reference, fidelity.describe_reference(reference, metric.name, res)
        elif decoded:
            raise ConfigError(
                f"metric '{name}' on VAE-decoded latents needs reference images: pass --reference "
                f"FOLDER|STATS.npz|DATASET to onestep eval (or set eval.reference), e.g. an ImageNet "
                f"folder, statistics from tools/fid_stats.py, or ADM's VIRTUAL_imagenet256_labeled.npz"
            )
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
