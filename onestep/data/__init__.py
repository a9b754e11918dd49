"""Datasets: the ``Dataset`` protocol, the step-indexed ``BatchStream`` and the shipped sets.

Importing this package registers every dataset factory in ``onestep.registry.DATASETS``.
"""

from . import idx, images, toy  # noqa: F401  (registration side effects)
from .base import BatchStream, Dataset, TensorDataset

__all__ = ["BatchStream", "Dataset", "TensorDataset", "idx", "images", "toy"]
