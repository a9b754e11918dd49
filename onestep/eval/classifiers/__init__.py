"""Reference classifiers for small labeled image sets (``base``: the machinery; ``instances``: digits,
fashion_mnist, mnist; ``metrics``: fd, is, acc and the legacy digits_* names)."""

from . import instances, metrics  # noqa: F401  (registers the instances and the metrics)
from .base import SPECS, ClassifierSpec, Loaded, family_of, load_classifier, spec_of, weights_sha256

__all__ = ["SPECS", "ClassifierSpec", "Loaded", "family_of", "load_classifier", "spec_of", "weights_sha256"]
