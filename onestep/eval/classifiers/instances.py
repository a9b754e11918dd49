"""The registered reference classifiers: ``digits`` (scikit-learn's 8x8 digits), ``fashion_mnist`` and
``mnist`` (28x28, trained on the run's own data root)."""

from __future__ import annotations

from functools import partial

from torch import Tensor

from onestep.registry import ConfigError

from .base import ClassifierSpec, register
from .nets import DigitsCNN, SmallCNN, prepare_8px, prepare_28px, shift_augment


def _digits_splits(dataset, split: str) -> tuple[Tensor, Tensor]:
    from onestep.data.images import digits

    ds = digits(conditional=True, split=split)
    return ds.x, ds.y


def _family_splits(name: str, dataset, split: str) -> tuple[Tensor, Tensor]:
    """A split of ``dataset``'s family, read from where ``dataset`` reads (its data.root)."""
    if dataset is None or getattr(dataset, "family", None) != name or not hasattr(dataset, "load_split"):
        raise ConfigError(
            f"the {name} reference classifier is trained on the {name} train split the first time it "
            f"is needed: score a run whose data is {name} (its data.root is used), or put a trained "
            f"classifier in the cache ($ONESTEP_CACHE)"
        )
    ds = dataset.load_split(split, conditional=True)
    return ds.x, ds.y


DIGITS = register(
    ClassifierSpec(
        name="digits",
        title="digits-CNN",
        version=1,
        feature_dim=64,
        build_net=DigitsCNN,
        prepare=prepare_8px,
        splits=_digits_splits,
        augment=shift_augment,
        epochs=20,
        batch_size=128,
        lr=5e-3,
        min_test_accuracy=0.97,
    )
)

FASHION_MNIST = register(
    ClassifierSpec(
        name="fashion_mnist",
        title="fashion_mnist-CNN",
        version=1,
        feature_dim=128,
        build_net=SmallCNN,
        prepare=partial(prepare_28px, what="fashion_mnist"),
        splits=partial(_family_splits, "fashion_mnist"),
        augment=partial(shift_augment, max_shift=2, flip=True),
        epochs=4,
        batch_size=128,
        lr=2e-3,
        min_test_accuracy=0.90,
    )
)

MNIST = register(
    ClassifierSpec(
        name="mnist",
        title="mnist-CNN",
        version=1,
        feature_dim=128,
        build_net=SmallCNN,
        prepare=partial(prepare_28px, what="mnist"),
        splits=partial(_family_splits, "mnist"),
        augment=partial(shift_augment, max_shift=2),
        epochs=3,
        batch_size=128,
        lr=2e-3,
        min_test_accuracy=0.98,
    )
)
