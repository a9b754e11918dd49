"""Evaluation samples: sample i always uses noise seeded by ``sample_seed(seed, i)`` (and any
multi-step re-noising seeded per sample) and, for class-conditional data, class i % C (or one
``class_id`` for all, or ``labels[i]``), so the same seed gives the same samples at any batch size
and on any number of ranks. ``onestep sample``, ``onestep eval``, ``onestep.generate`` and
torch-fidelity's generator all go through ``sample_indices``. ``cond`` (guidance scale and interval
as network inputs, ``sampling.guidance_cond``) goes to every sampling step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from onestep.sampling import balanced_labels, sample
from onestep.utils.distributed import broadcast_object, current, gather_batch
from onestep.utils.seeding import sample_seed, seeded_noise


def labels_of(
    indices: list[int], num_classes: int, class_id: int | None = None, labels: Tensor | None = None
) -> Tensor | None:
    """The classes of samples ``indices``: ``labels[i]`` when given, else ``class_id``, else i % C
    (None for unconditional data)."""
    y = balanced_labels(indices, num_classes)
    if y is None:
        return None
    if labels is not None:
        return labels[torch.as_tensor(list(indices), dtype=torch.long)].to(torch.long)
    return y if class_id is None else torch.full_like(y, class_id)


@torch.no_grad()
def sample_indices(
    objective,
    net,
    dataset,
    indices: list[int],
    *,
    nfe: int,
    seed: int,
    device,
    class_id: int | None = None,
    labels: Tensor | None = None,
    cond: dict | None = None,
) -> Tensor:
    """Samples number ``indices`` (float, on ``device``): noise and any re-noising seeded per sample,
    class i % C (or ``class_id``, or ``labels[i]``) for conditional data. Sample i does not depend on
    its batch."""
    seeds = [sample_seed(seed, i) for i in indices]
    noise = seeded_noise(seeds, tuple(dataset.shape), device)
    y = labels_of(indices, dataset.num_classes, class_id, labels)
    return sample(objective, net, noise, None if y is None else y.to(device), nfe=nfe, seeds=seeds, cond=cond).float()


def per_rank_sampler(
    objective,
    net,
    dataset,
    *,
    nfe: int,
    seed: int,
    device,
    class_id: int | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    labels: Tensor | None = None,
    cond: dict | None = None,
) -> Callable[[list[int]], Tensor]:
    """``fn(indices) -> samples`` (then ``transform``) for ``distributed.gather_batch``."""

    def one_rank(idx: list[int]) -> Tensor:
        x = sample_indices(
            objective, net, dataset, idx, nfe=nfe, seed=seed, device=device, class_id=class_id, labels=labels, cond=cond
        )
        return x if transform is None else transform(x)

    return one_rank


@torch.no_grad()
def generate(
    objective,
    net,
    dataset,
    *,
    num_samples: int,
    nfe: int,
    seed: int,
    batch_size: int,
    device,
    class_id: int | None = None,
    transform=None,
    labels: Tensor | None = None,
    cond: dict | None = None,
    cache=None,
) -> tuple[Tensor, Tensor | None]:
    """num_samples samples in batches; returns (samples on CPU, labels or None). ``transform``
    maps each batch on the device before it moves to the CPU (e.g. VAE decoding to uint8).
    ``labels`` (num_samples,): the class of each sample (instead of i % C or ``class_id``).
    Under torchrun every rank calls it: each batch is split over the ranks and all-gathered, and
    every rank returns all samples (the same as one process would). ``cache``
    (``sample_cache.SampleCache``): batches it holds are read instead of generated (rank 0 reads,
    the other ranks get them by broadcast), and each generated batch is saved to it (by rank 0), so
    a killed eval resumes where it stopped."""
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
        if labels.numel() != num_samples:
            raise ValueError(f"got {labels.numel()} labels for {num_samples} samples")
    one_rank = per_rank_sampler(
        objective,
        net,
        dataset,
        nfe=nfe,
        seed=seed,
        device=device,
        class_id=class_id,
        transform=transform,
        labels=labels,
        cond=cond,
    )
    outs, ys = [], []
    for start in range(0, num_samples, batch_size):
        idx = list(range(start, min(start + batch_size, num_samples)))
        y = labels_of(idx, dataset.num_classes, class_id, labels)
        if y is not None:
            ys.append(y)
        held = None
        if cache is not None:
            held = broadcast_object(cache.load(idx[0], idx[-1] + 1) if current().is_main else None)
        if held is not None:
            outs.append(held)
            continue
        outs.append(gather_batch(one_rank, idx).cpu())
        if cache is not None and current().is_main:
            cache.save(idx[0], idx[-1] + 1, outs[-1])
    return torch.cat(outs), (torch.cat(ys) if ys else None)


def model_generator_fn(
    objective,
    net,
    dataset,
    *,
    nfe: int,
    seed: int,
    device=None,
    class_id: int | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    cond: dict | None = None,
) -> Callable[[Tensor], Tensor]:
    """A ``generator_fn(indices) -> samples (B, C, H, W) in [-1, 1]`` for torch-fidelity that
    reproduces ``generate``: sample i as ``sample_indices`` makes it, then ``transform`` (e.g. VAE
    decoding). Under torchrun every rank must call it with the same indices: the ranks split each
    batch and all-gather it (``distributed.gather_batch``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    one_rank = per_rank_sampler(
        objective, net, dataset, nfe=nfe, seed=seed, device=device, class_id=class_id, transform=transform, cond=cond
    )

    def generator_fn(indices: Tensor) -> Tensor:
        return gather_batch(one_rank, [int(i) for i in indices])

    return generator_fn
