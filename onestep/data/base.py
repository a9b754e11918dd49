"""The dataset protocol and the step-indexed batch stream.

Every registered dataset factory returns a ``Dataset``:

- ``shape``: per-sample shape, ``(D,)`` for vector data or ``(C, H, W)`` for images;
- ``num_classes``: 0 for unconditional data;
- ``kind``: ``"vector"`` (data coordinates) or ``"image"`` (values in [-1, 1]);
- finite sets hold tensors ``x`` (N, *shape) and ``y`` (N,) int64 or None and are indexed with
  ``get(indices)``; generated sets (``size is None``) draw fresh samples with
  ``generate(n, generator)``.

``BatchStream`` turns a dataset into the batch for a given global ``step`` and rank as a pure
function of (seed, step, rank): resuming or changing the world size needs no hidden sampler state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from onestep.utils.seeding import batch_seed, epoch_seed


class Dataset:
    shape: tuple[int, ...] = ()
    num_classes: int = 0
    kind: str = "vector"
    name: str = "dataset"

    @property
    def size(self) -> int | None:
        """Number of examples, or None for data generated on the fly."""
        return None

    def get(self, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def generate(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def reference(self, n: int, seed: int = 12345) -> tuple[Tensor, Tensor | None]:
        """Data samples to score generated samples against: fresh draws for generated sets,
        the whole set (or a seeded subset of n) for finite ones."""
        g = torch.Generator().manual_seed(seed)
        if self.size is None:
            return self.generate(n, g)
        if n >= self.size:
            return self.get(torch.arange(self.size))
        return self.get(torch.randperm(self.size, generator=g)[:n])


class TensorDataset(Dataset):
    """A finite dataset held in memory as tensors (float32, or x's own dtype with ``keep_dtype``)."""

    def __init__(
        self, x: Tensor, y: Tensor | None, *, num_classes: int, kind: str, name: str, keep_dtype: bool = False
    ):
        self.x = (x if keep_dtype else x.float()).contiguous()
        self.y = None if y is None else y.long().contiguous()
        self.shape = tuple(self.x.shape[1:])
        self.num_classes = num_classes
        self.kind = kind
        self.name = name

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def get(self, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.x[indices], (None if self.y is None else self.y[indices])


class BatchStream:
    """The batch of global ``step`` for one rank.

    Finite data: epochs of a seeded permutation; the global batch of step k covers positions
    [k*B, (k+1)*B) of the concatenated epochs and rank i takes its contiguous slice.
    Generated data: a generator seeded from (seed, step, rank).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        allow_repeats: bool = False,
    ):
        if batch_size % world_size:
            raise ValueError(f"train.batch_size={batch_size} must be divisible by the world size {world_size}")
        if dataset.size is not None and batch_size > dataset.size and not allow_repeats:
            raise ValueError(
                f"train.batch_size={batch_size} is larger than the {dataset.size} examples of "
                f"'{dataset.name}', so a batch would repeat examples; lower it, or set "
                f"train.batch_with_repeats=true to allow that"
            )
        self.dataset = dataset
        self.global_batch = batch_size
        self.local_batch = batch_size // world_size
        self.seed = seed
        self.rank = rank
        self._perm_cache: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.clear()
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._perm_cache[epoch] = torch.randperm(self.dataset.size, generator=g)
        return self._perm_cache[epoch]

    def indices(self, step: int) -> Tensor:
        n = self.dataset.size
        start = step * self.global_batch + self.rank * self.local_batch
        pos = torch.arange(start, start + self.local_batch)
        epochs = pos // n
        out = torch.empty_like(pos)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._perm(epoch)[pos[mask] % n]
        return out

    def batch(self, step: int) -> tuple[Tensor, Tensor | None]:
        if self.dataset.size is None:
            g = torch.Generator().manual_seed(batch_seed(self.seed, step, self.rank))
            return self.dataset.generate(self.local_batch, g)
        return self.dataset.get(self.indices(step))
