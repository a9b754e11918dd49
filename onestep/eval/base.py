"""The metric protocol. Every registered metric factory returns a ``Metric`` whose class attributes
declare what it needs, so the evaluator asks instead of guessing:

- ``kinds``: the data kinds it scores ("vector", "image", "latent"). Image metrics on latent data
  whose dataset decodes to images (``data.vae``) see the decoded images.
- ``needs_reference``: it compares against data: in-memory metrics get reference samples from the
  dataset; streaming metrics get a reference spec (a folder, statistics, a dataset) or the training
  images.
- ``needs_labels``: it receives the class each sample was generated for (None when unconditional).
- ``reference_split``: the split of the data's family its reference comes from ("test" for the
  reference-classifier metrics: the whole test split), or None for the dataset's own samples.
- ``streaming``: it consumes a sample generator, ``from_generator(fn, num_samples, reference, ...)``,
  instead of a tensor of samples (torch-fidelity metrics: nothing is held in memory).

``implementation`` names the metric, its version and every setting that changes the number, so rows
computed differently never share a column in ``onestep compare``.
"""

from __future__ import annotations

from torch import Tensor

KINDS = ("vector", "image", "latent")


class Metric:
    name: str = "metric"
    implementation: str = ""
    higher_is_better: bool = False
    kinds: tuple[str, ...] = KINDS
    needs_reference: bool = True
    needs_labels: bool = False
    reference_split: str | None = None
    streaming: bool = False

    def __call__(self, samples: Tensor, reference: Tensor | None = None, labels: Tensor | None = None) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.implementation!r})"
