"""Metrics in a reference classifier's space. Notation: x a sample, y a class, p(y|x) the classifier's
softmax, f(x) its penultimate (post-ReLU) features.

- ``fd``: Frechet distance between Gaussian fits of f(samples) and f(reference),
  FD = |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2) (``onestep.eval.frechet``),
  against the family's test split. Lower is better.
- ``is``: exp(E_x KL(p(y|x) || p(y))), p(y) = E_x p(y|x) over all samples (one split); between 1
  and the number of classes. Higher is better. No reference.
- ``acc``: fraction of samples classified as the class they were generated for (``needs_labels``;
  NaN for unconditional runs).
- ``precision`` / ``recall`` (``onestep.eval.sample_metrics``) take the same ``classifier`` option and
  then measure the k-NN manifolds of f(x), against the test split.

``classifier`` names the instance (``digits``, ``fashion_mnist``, ``mnist``); ``onestep eval`` fills it
in from the run's data. The legacy ``digits_fd`` / ``digits_is`` / ``digits_acc`` are the digits
instance scored against the run's own data (all 1797 images), as the digits results were first
reported.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from onestep.eval.base import Metric
from onestep.eval.frechet import frechet_distance, gaussian_stats
from onestep.registry import METRICS, ConfigError

from .base import SPECS, Loaded, load_classifier


class ClassifierMetric(Metric):
    """A metric computed with the reference classifier ``classifier``; ``dataset`` (set by the
    evaluator) is where the classifier's training data comes from the first time it is needed."""

    kinds = ("image",)
    needs_reference = False
    reference_split: str | None = "test"
    min_samples = 2
    label = ""

    def __init__(self, classifier: str | None = None):
        if classifier is not None and classifier not in SPECS:
            raise ConfigError(
                f"metric '{self.name}': key 'classifier' must be one of {', '.join(sorted(SPECS))}, got {classifier!r}"
            )
        self.classifier = classifier
        self.dataset = None
        self._implementation = None

    def loaded(self) -> Loaded:
        if self.classifier is None:
            raise ConfigError(
                f"metric '{self.name}' needs a reference classifier (one of {', '.join(sorted(SPECS))}): "
                f"onestep eval picks it from the run's data; this data has none"
            )
        return load_classifier(self.classifier, self.dataset)

    @property
    def implementation(self) -> str:
        """The classifier's identity (its test accuracy and weights hash) plus what is computed."""
        return f"{self.loaded().implementation}, {self.label}"

    def __call__(self, samples: Tensor, reference: Tensor | None = None, labels: Tensor | None = None) -> float:
        samples = torch.as_tensor(samples)
        if len(samples) < self.min_samples:
            raise ValueError(f"{self.name}: needs at least {self.min_samples} samples, got {len(samples)}")
        return float(self.score(self.loaded(), samples, reference, labels))

    def score(self, clf: Loaded, samples: Tensor, reference: Tensor | None, labels: Tensor | None) -> float:
        raise NotImplementedError


class FD(ClassifierMetric):
    __doc__ = "Frechet distance of reference-classifier features (lower is better)."
    name = "fd"
    higher_is_better = False
    needs_reference = True
    label = "penultimate features, Frechet distance (float64, eigh sqrtm)"

    def score(self, clf, samples, reference, labels):
        if reference is None or len(reference) < 2:
            raise ValueError(f"{self.name}: needs a reference set of at least 2 images")
        fx, _ = clf.features_and_probs(samples)
        fy, _ = clf.features_and_probs(reference)
        return frechet_distance(*gaussian_stats(fx), *gaussian_stats(fy))


class IS(ClassifierMetric):
    __doc__ = "Inception-score analogue exp(E KL(p(y|x) || p(y))) with the reference classifier (higher is better)."
    name = "is"
    higher_is_better = True
    reference_split = None
    label = "exp(E KL(p(y|x)||p(y))), one split"

    def score(self, clf, samples, reference, labels):
        _, p = clf.features_and_probs(samples)
        p_y = p.mean(0, keepdim=True)
        kl = (p * (p.clamp_min(1e-30).log() - p_y.clamp_min(1e-30).log())).sum(1)
        return math.exp(kl.mean().item())


class Accuracy(ClassifierMetric):
    __doc__ = "Accuracy of samples for the class they were generated for (higher is better; NaN without labels)."
    name = "acc"
    higher_is_better = True
    needs_labels = True
    reference_split = None
    min_samples = 1
    label = "argmax accuracy vs requested class"

    def score(self, clf, samples, reference, labels):
        if labels is None:
            return float("nan")  # unconditional run: there is no requested class
        labels = torch.as_tensor(labels).long().cpu().reshape(-1)
        if len(labels) != len(samples):
            raise ValueError(f"{self.name}: {len(samples)} samples but {len(labels)} labels")
        _, p = clf.features_and_probs(samples)
        return (p.argmax(1) == labels).double().mean().item()


@METRICS.register("fd", tags=("image", "classifier"))
def fd(classifier: str | None = None) -> FD:
    """Frechet distance in the reference classifier's feature space vs the test split (lower is better)."""
    return FD(classifier)


@METRICS.register("is", tags=("image", "classifier"))
def inception_score(classifier: str | None = None) -> IS:
    """Inception-score analogue with the reference classifier (higher is better)."""
    return IS(classifier)


@METRICS.register("acc", tags=("image", "classifier"))
def acc(classifier: str | None = None) -> Accuracy:
    """Accuracy of class-conditional samples for their requested class (higher is better)."""
    return Accuracy(classifier)


# The digits instance against the run's own data (the first digits results' convention).
def _legacy(cls, name: str):
    legacy = type(f"Digits{cls.__name__}", (cls,), {"name": name, "reference_split": None})

    def factory():
        return legacy("digits")

    factory.__doc__ = f"{cls.__doc__.split('(')[0].strip()} with the digits classifier, vs the run's data (legacy)."
    return factory


METRICS.register("digits_fd", tags=("image", "digits"))(_legacy(FD, "digits_fd"))
METRICS.register("digits_is", tags=("image", "digits"))(_legacy(IS, "digits_is"))
METRICS.register("digits_acc", tags=("image", "digits"))(_legacy(Accuracy, "digits_acc"))
