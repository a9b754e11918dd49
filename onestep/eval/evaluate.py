"""Score n-NFE samples of a model against its data: one row per (step, nfe, metric).

Sample i always uses noise seeded by (seed, i) and, for class-conditional data, class i % C, so the
same seed gives the same samples at any batch size.

Latent data with a VAE (``data.vae``, ``dataset.decodes_to_images``): torch-fidelity metrics
(fid, isc, kid, prc; the defaults are fid + isc) see the VAE-decoded images, decoded batch by batch
inside the generator so nothing is stored; their reference must be given (``reference=``: a folder,
an .npz of statistics or images, a dataset name) and the rows say the images were decoded. Other
metrics score the latents themselves.
"""
from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any

import torch

from onestep.registry import METRICS, ConfigError
from onestep.sampling import balanced_labels, sample, seeded_noise

DEFAULT_METRICS = {"vector": ["sliced_wasserstein", "energy_distance"],
                   "image": ["fid", "isc"],
                   "latent": ["sliced_wasserstein"]}
IMAGE_METRICS_NEED_REFERENCE = ("fid", "kid", "prc")


def decodes_to_images(dataset) -> bool:
    """Latent data whose samples are decoded into images by a VAE (``data.vae``)."""
    return bool(getattr(dataset, "decodes_to_images", False))


def default_metrics(dataset) -> list[str]:
    """Per data kind; the bundled digits get the toolkit's own classifier metrics (no download);
    latents with a VAE get the image metrics (fid, isc) of their decoded samples."""
    if dataset.name == "digits":
        return ["digits_fd", "digits_is"] + (["digits_acc"] if dataset.num_classes else [])
    if decodes_to_images(dataset):
        return list(DEFAULT_METRICS["image"])
    return list(DEFAULT_METRICS.get(dataset.kind, ["sliced_wasserstein"]))


def build_metric(name: str, feature_extractor: str | None = None):
    """METRICS.build(name), with ``feature_extractor`` passed to metrics that take one."""
    kwargs = {}
    if feature_extractor and "feature_extractor" in inspect.signature(METRICS.get(name)).parameters:
        kwargs["feature_extractor"] = feature_extractor
    return METRICS.build(name, **kwargs)


def sample_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


@torch.no_grad()
def sample_indices(objective, net, dataset, indices: list[int], *, nfe: int, seed: int, device,
                   class_id: int | None = None) -> torch.Tensor:
    """Samples number ``indices`` (float, on ``device``): noise and any re-noising seeded per sample,
    class i % C (or ``class_id``) for conditional data. Sample i does not depend on its batch."""
    seeds = [sample_seed(seed, i) for i in indices]
    noise = seeded_noise(seeds, tuple(dataset.shape), device)
    y = balanced_labels(indices, dataset.num_classes)
    if y is not None and class_id is not None:
        y = torch.full_like(y, class_id)
    return sample(objective, net, noise, None if y is None else y.to(device), nfe=nfe, seeds=seeds).float()


@torch.no_grad()
def generate(objective, net, dataset, *, num_samples: int, nfe: int, seed: int, batch_size: int,
             device, class_id: int | None = None, transform=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """num_samples samples in batches; returns (samples on CPU, labels or None). ``transform``
    maps each batch on the device before it moves to the CPU (e.g. VAE decoding to uint8).
    Under torchrun every rank calls it: each batch is split over the ranks and all-gathered, and
    every rank returns all samples (the same as one process would)."""
    from onestep.train.distributed import gather_batch

    def one_rank(idx: list[int]) -> torch.Tensor:
        x = sample_indices(objective, net, dataset, idx, nfe=nfe, seed=seed, device=device, class_id=class_id)
        return x if transform is None else transform(x)

    outs, labels = [], []
    for start in range(0, num_samples, batch_size):
        idx = list(range(start, min(start + batch_size, num_samples)))
        y = balanced_labels(idx, dataset.num_classes)
        if y is not None:
            labels.append(y if class_id is None else torch.full_like(y, class_id))
        outs.append(gather_batch(one_rank, idx).cpu())
    return torch.cat(outs), (torch.cat(labels) if labels else None)


def evaluate_model(objective, net, dataset, *, nfes: list[int], metrics: list[str] | None, num_samples: int,
                   seed: int, batch_size: int, device, step: int, weights: str,
                   reference_seed: int = 12345, reference: Any = None,
                   feature_extractor: str | None = None) -> list[dict[str, Any]]:
    """Rows {step, nfe, metric, value, num_samples, implementation, reference, ...} for every nfe
    and metric. ``reference``: what torch-fidelity metrics compare against instead of the training
    set (needed for latent data; see the module doc). ``feature_extractor`` replaces the default
    extractor of the metrics that take one (e.g. the download-free ``onestep-random-conv``)."""
    metric_names = list(metrics) if metrics else default_metrics(dataset)
    metric_objs = [build_metric(name, feature_extractor) for name in metric_names]
    streamed = [hasattr(m, "from_generator") for m in metric_objs]  # torch-fidelity metrics
    data_reference = ref_desc = None
    if not all(streamed):
        data_reference, _ = dataset.reference(num_samples, seed=reference_seed)
        ref_desc = (f"{dataset.name}: {data_reference.shape[0]} fresh samples (seed {reference_seed})"
                    if dataset.size is None else
                    f"{dataset.name}: {data_reference.shape[0]} of {dataset.size} data samples")
    net.eval()
    rows = []
    for nfe in nfes:
        grid = [round(v, 6) for v in objective.time_grid(nfe).tolist()]
        samples = labels = None
        gen_s = float("nan")
        if not all(streamed):
            t0 = time.perf_counter()
            samples, labels = generate(objective, net, dataset, num_samples=num_samples, nfe=nfe, seed=seed,
                                       batch_size=batch_size, device=device)
            gen_s = time.perf_counter() - t0
        for name, metric, stream in zip(metric_names, metric_objs, streamed):
            t0 = time.perf_counter()
            if stream:
                value, desc, impl = _streamed(metric, name, objective, net, dataset, nfe=nfe, seed=seed,
                                              num_samples=num_samples, device=device, reference=reference)
            else:
                kwargs = {"labels": labels} if getattr(metric, "needs_labels", False) else {}
                value, desc, impl = float(metric(samples, data_reference, **kwargs)), ref_desc, metric.implementation
            elapsed = time.perf_counter() - t0 + (0.0 if stream else gen_s)
            rows.append({
                "step": step, "nfe": nfe, "metric": name, "value": value,
                "num_samples": num_samples, "implementation": impl,
                "reference": desc, "higher_is_better": metric.higher_is_better,
                "grid": grid, "weights": weights, "seed": seed,
                "samples_per_s": round(num_samples / max(elapsed, 1e-9), 1),
            })
    return rows


def _streamed(metric, name: str, objective, net, dataset, *, nfe: int, seed: int, num_samples: int, device,
              reference: Any = None) -> tuple[float, str, str]:
    """Samples generated batch by batch straight into torch-fidelity (VAE-decoded first for latent
    data); the reference is ``reference`` or else the whole training set through its loader, its
    statistics cached by dataset + resolution + extractor. Returns (value, reference, implementation)."""
    from onestep.eval import fidelity

    decoded = decodes_to_images(dataset)
    if dataset.kind != "image" and not decoded:
        hint = (": set data.vae (a Hugging Face id or a local AutoencoderKL directory) to score decoded images"
                if dataset.kind == "latent" else "")
        raise ConfigError(f"metric '{name}' scores images; the data '{dataset.name}' is {dataset.kind} data{hint}")
    fn = fidelity.model_generator_fn(objective, net, dataset, nfe=nfe, seed=seed, device=device,
                                     transform=dataset.decode if decoded else None)
    implementation = metric.implementation
    if decoded:
        implementation += f"; {dataset.describe_decoder()}"
    res = int(dataset.image_shape[-1] if decoded else dataset.shape[-1])
    ref, cache_name, desc = None, None, "none (needs no reference)"
    if not decoded and reference is None:
        ref, cache_name = dataset, fidelity.reference_cache_name(dataset.name, res)
        desc = f"{dataset.name}: all {dataset.size} training images at {res}px"
    elif metric.name in IMAGE_METRICS_NEED_REFERENCE:
        if reference is None:
            raise ConfigError(f"metric '{name}' on VAE-decoded latents needs reference images: pass --reference "
                              f"FOLDER|STATS.npz|DATASET to onestep eval (or set eval.reference), e.g. an ImageNet "
                              f"folder, statistics from tools/fid_stats.py, or ADM's VIRTUAL_imagenet256_labeled.npz")
        ref, desc = reference, fidelity.describe_reference(reference, metric.name, res)
    from onestep.train.distributed import broadcast_object, current

    if current().is_main:
        value = metric.from_generator(fn, num_samples, ref, cache_name=cache_name, reference_resolution=res)
    else:
        # torch-fidelity runs on rank 0; the other ranks generate their share of the same batches
        # (torch-fidelity's order: batch_size at a time from index 0), joining each all-gather.
        batch = min(metric.batch_size, num_samples)
        for start in range(0, num_samples, batch):
            fn(torch.arange(start, min(start + batch, num_samples)))
        value = None
    return float(broadcast_object(value)), desc, implementation


def write_rows(run_dir: str | Path, rows: list[dict[str, Any]]) -> None:
    path = Path(run_dir) / "metrics.jsonl"
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
