"""Score n-NFE samples of a model against its data: one row per (step, nfe, metric).

Sample i always uses noise seeded by (seed, i) and, for class-conditional data, class i % C, so the
same seed gives the same samples at any batch size.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from onestep.registry import METRICS
from onestep.sampling import balanced_labels, sample, seeded_noise

DEFAULT_METRICS = {"vector": ["sliced_wasserstein", "energy_distance"],
                   "image": ["fid", "isc"],
                   "latent": ["sliced_wasserstein"]}


def default_metrics(dataset) -> list[str]:
    """Per data kind; the bundled digits get the toolkit's own classifier metrics (no download)."""
    if dataset.name == "digits":
        return ["digits_fd", "digits_is"] + (["digits_acc"] if dataset.num_classes else [])
    return list(DEFAULT_METRICS.get(dataset.kind, ["sliced_wasserstein"]))


def sample_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


@torch.no_grad()
def generate(objective, net, dataset, *, num_samples: int, nfe: int, seed: int, batch_size: int,
             device, class_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """num_samples samples in batches; returns (samples on CPU, labels or None)."""
    outs, labels = [], []
    for start in range(0, num_samples, batch_size):
        idx = range(start, min(start + batch_size, num_samples))
        noise = seeded_noise([sample_seed(seed, i) for i in idx], tuple(dataset.shape), device)
        y = balanced_labels(idx, dataset.num_classes)
        if y is not None and class_id is not None:
            y = torch.full_like(y, class_id)
        if y is not None:
            labels.append(y)
            y = y.to(device)
        torch.manual_seed(sample_seed(seed, start))  # multi-step consistency re-noising draws from it
        outs.append(sample(objective, net, noise, y, nfe=nfe).float().cpu())
    return torch.cat(outs), (torch.cat(labels) if labels else None)


def evaluate_model(objective, net, dataset, *, nfes: list[int], metrics: list[str] | None, num_samples: int,
                   seed: int, batch_size: int, device, step: int, weights: str,
                   reference_seed: int = 12345) -> list[dict[str, Any]]:
    metric_names = list(metrics) if metrics else default_metrics(dataset)
    metric_objs = [METRICS.build(name) for name in metric_names]
    streamed = [hasattr(m, "from_generator") for m in metric_objs]  # torch-fidelity metrics
    reference = ref_desc = None
    if not all(streamed):
        reference, _ = dataset.reference(num_samples, seed=reference_seed)
        ref_desc = (f"{dataset.name}: {reference.shape[0]} fresh samples (seed {reference_seed})"
                    if dataset.size is None else
                    f"{dataset.name}: {reference.shape[0]} of {dataset.size} data samples")
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
                value, desc = _streamed(metric, objective, net, dataset, nfe=nfe, seed=seed,
                                        num_samples=num_samples, device=device)
            else:
                kwargs = {"labels": labels} if getattr(metric, "needs_labels", False) else {}
                value, desc = float(metric(samples, reference, **kwargs)), ref_desc
            elapsed = time.perf_counter() - t0 + (0.0 if stream else gen_s)
            rows.append({
                "step": step, "nfe": nfe, "metric": name, "value": value,
                "num_samples": num_samples, "implementation": metric.implementation,
                "reference": desc, "higher_is_better": metric.higher_is_better,
                "grid": grid, "weights": weights, "seed": seed,
                "samples_per_s": round(num_samples / max(elapsed, 1e-9), 1),
            })
    return rows


def _streamed(metric, objective, net, dataset, *, nfe: int, seed: int, num_samples: int, device):
    """Samples generated batch by batch straight into torch-fidelity; the reference is the whole
    training set through its loader, its statistics cached by dataset + resolution + extractor."""
    from onestep.eval import fidelity

    fn = fidelity.model_generator_fn(objective, net, dataset, nfe=nfe, seed=seed, device=device)
    res = int(dataset.shape[-1])
    value = metric.from_generator(fn, num_samples, dataset, cache_name=fidelity.reference_cache_name(dataset.name, res))
    return float(value), f"{dataset.name}: all {dataset.size} training images at {res}px"


def write_rows(run_dir: str | Path, rows: list[dict[str, Any]]) -> None:
    path = Path(run_dir) / "metrics.jsonl"
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
