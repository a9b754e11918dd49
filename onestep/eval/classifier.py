"""Digits-classifier metrics: the small-image convention of scoring samples with a classifier
trained once by the toolkit (here on scikit-learn's 8x8 ``digits``, see ``onestep.data.images``).

The classifier ("onestep digits-CNN v1") is a 3-conv CNN trained on the digits TRAIN split with
seed 0 (3-9 s on one CPU thread; >= 97% on the held-out TEST split). It is cached at
``$ONESTEP_CACHE/digits_classifier_v1.pt`` (default ``~/.cache/onestep/``), saved atomically and
loaded with ``torch.load(weights_only=True)``; a missing or unreadable cache is retrained on the
fly and saved. Notation: x a sample, y in {0..9} a class, p(y|x) the classifier's softmax,
f(x) in R^64 its penultimate (post-ReLU) features.

Registered metrics (``__call__(samples, reference, labels=None) -> float``):

- ``digits_fd``: Frechet distance between Gaussian fits of f(samples) and f(reference),
  FD = |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2), float64, covariances with
  1/(N-1); the matrix square roots are symmetric eigen-decompositions (eigenvalues clipped at 0),
  which equals tr((S_x S_y)^1/2) without complex arithmetic. Lower is better.
- ``digits_is``: exp(E_x KL(p(y|x) || p(y))), p(y) = E_x p(y|x) over all samples (one split).
  Between 1 and 10; higher is better. The reference is not used.
- ``digits_acc``: fraction of samples classified as the class they were generated for
  (``needs_labels``); NaN when ``labels`` is None (unconditional runs have no requested class).

The classifier runs on the CPU. Numbers are comparable between machines that share the cache
file; a retrain on another torch build may differ slightly (the implementation string names the
recipe, not the weights' hash).

Inputs: float tensors (N, 1, S, S) in [-1, 1] (clamped). S > 8 is resized to 8 with area
averaging (the mean over each cell; exact block means when 8 divides S); 3-channel images are
averaged to one channel. Compare samples with a reference of the same resolution: both go through
the same resize (an 8 -> 16 bilinear upsample followed by the area resize is a slight blur, so
16-px digits scored against 8-px references carry a resolution penalty).
"""
from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestep.eval.base import Metric
from onestep.eval.frechet import frechet_distance, gaussian_stats
from onestep.registry import METRICS, ConfigError
from onestep.utils.cache import cache_dir

CLASSIFIER_VERSION = 1
CLASSIFIER_FILE = f"digits_classifier_v{CLASSIFIER_VERSION}.pt"
CLASSIFIER_SEED = 0
FEATURE_DIM = 64
MIN_TEST_ACCURACY = 0.97
IMPLEMENTATION = (f"onestep digits-CNN v{CLASSIFIER_VERSION}, penultimate {FEATURE_DIM}-d features, "
                  f"seed {CLASSIFIER_SEED}")

# Training schedule (fixed: part of "v1").
_EPOCHS = 20
_BATCH = 128
_LR = 5e-3



def classifier_path() -> Path:
    return cache_dir() / CLASSIFIER_FILE


class DigitsCNN(nn.Module):
    """(B, 1, 8, 8) in [-1, 1] -> logits (B, 10); ``features`` gives the 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 4x4
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 2x2
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return f, self.head(f)


def _digits_split(split: str) -> tuple[Tensor, Tensor]:
    from onestep.data.images import digits

    ds = digits(conditional=True, split=split)
    return ds.x, ds.y


def _shift_augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random translation by up to one pixel (zero = background -1 padding)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    shift = torch.randint(0, 9, (x.shape[0],), generator=g)
    out = torch.empty_like(x)
    for k in range(9):
        dy, dx = divmod(k, 3)
        rows = shift == k
        out[rows] = padded[rows, :, dy:dy + 8, dx:dx + 8]
    return out


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    net.eval()
    return (net(x).argmax(1) == y).double().mean().item()


def train_classifier(seed: int = CLASSIFIER_SEED) -> tuple[DigitsCNN, float]:
    """Train the v1 classifier on the digits train split; returns (net, test accuracy).

    Deterministic for a given seed and torch version (its own generators; the global RNG is
    forked, so callers' random streams are untouched).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: one thread is fastest, and the result is thread-count independent
    try:
        with torch.enable_grad():  # also when first needed inside a no-grad scorer (digits_acc alone)
            return _train(seed)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int) -> tuple[DigitsCNN, float]:
    x, y = _digits_split("train")
    x_test, y_test = _digits_split("test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsCNN()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=_LR)
    steps_per_epoch = math.ceil(len(x) / _BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=_LR, total_steps=_EPOCHS * steps_per_epoch)
    for _ in range(_EPOCHS):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), _BATCH):
            idx = perm[start:start + _BATCH]
            xb = _shift_augment(x[idx], g)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    return net, accuracy(net, x_test, y_test)


def _save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_LOADED: dict[str, DigitsCNN] = {}


def load_classifier(path: str | Path | None = None, *, retrain_if_missing: bool = True) -> DigitsCNN:
    """The cached v1 classifier (eval mode, CPU, no grad); trained and saved when missing."""
    path = Path(path) if path is not None else classifier_path()
    key = str(path.resolve()) if path.exists() else str(path)
    if key in _LOADED:
        return _LOADED[key]
    net = DigitsCNN()
    state = None
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("version") != CLASSIFIER_VERSION:
                raise ValueError(f"version {blob.get('version')} != {CLASSIFIER_VERSION}")
            net.load_state_dict(blob["state_dict"])
            state = blob
        except Exception as exc:  # corrupt or foreign file: retrain below
            warnings.warn(f"digits classifier cache {path} unusable ({exc}); retraining")
    if state is None:
        if not retrain_if_missing:
            raise ConfigError(f"digits classifier cache {path} is missing")
        t0 = time.perf_counter()
        net, acc = train_classifier()
        if acc < MIN_TEST_ACCURACY:  # pragma: no cover - guards against a broken torch build
            raise RuntimeError(f"digits classifier reached only {acc:.3f} test accuracy (< {MIN_TEST_ACCURACY})")
        _save_atomic({"version": CLASSIFIER_VERSION, "seed": CLASSIFIER_SEED, "test_accuracy": acc,
                      "train_seconds": time.perf_counter() - t0, "state_dict": net.state_dict()}, path)
    net.eval().requires_grad_(False)
    _LOADED[str(path.resolve())] = net
    return net


def prepare_digits(x: Tensor, name: str = "digits") -> Tensor:
    """(N, C, S, S) float in [-1, 1] -> (N, 1, 8, 8) float32 on CPU: clamp, gray, area-resize."""
    x = torch.as_tensor(x).detach()
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3] or x.shape[2] < 8:
        raise ValueError(f"{name}: samples must be (N, 1, S, S) images with S >= 8, got shape {tuple(x.shape)}")
    x = x.float().cpu().clamp(-1.0, 1.0)
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if x.shape[2] != 8:
        x = F.interpolate(x, size=(8, 8), mode="area")
    return x


@torch.no_grad()
def features_and_probs(x: Tensor, net: DigitsCNN | None = None, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Penultimate features (N, 64) and softmax p(y|x) (N, 10), float64."""
    net = net or load_classifier()
    x = prepare_digits(x)
    feats, probs = [], []
    for start in range(0, len(x), batch_size):
        f, logits = net.features_and_logits(x[start:start + batch_size])
        feats.append(f.double())
        probs.append(logits.double().softmax(1))
    return torch.cat(feats), torch.cat(probs)


class _DigitsMetric(Metric):
    implementation = IMPLEMENTATION
    kinds = ("image",)
    needs_reference = False
    min_samples = 2

    def __call__(self, samples: Tensor, reference: Tensor | None = None, labels: Tensor | None = None) -> float:
        samples = torch.as_tensor(samples)
        if len(samples) < self.min_samples:
            raise ValueError(f"{self.name}: needs at least {self.min_samples} samples, got {len(samples)}")
        return float(self.score(samples, reference, labels))

    def score(self, samples, reference, labels) -> float:
        raise NotImplementedError


class DigitsFD(_DigitsMetric):
    __doc__ = "Frechet distance of digits-CNN penultimate features (lower is better)."
    name = "digits_fd"
    higher_is_better = False
    needs_reference = True
    implementation = IMPLEMENTATION + ", Frechet distance (float64, eigh sqrtm)"

    def score(self, samples, reference, labels):
        if reference is None or len(reference) < 2:
            raise ValueError("digits_fd: needs a reference set of at least 2 images")
        net = load_classifier()
        fx, _ = features_and_probs(samples, net)
        fy, _ = features_and_probs(reference, net)
        return frechet_distance(*gaussian_stats(fx), *gaussian_stats(fy))


class DigitsIS(_DigitsMetric):
    __doc__ = "Inception-score analogue exp(E KL(p(y|x) || p(y))) with the digits CNN (higher is better, max 10)."
    name = "digits_is"
    higher_is_better = True
    implementation = IMPLEMENTATION + ", exp(E KL(p(y|x)||p(y))), one split"

    def score(self, samples, reference, labels):
        _, p = features_and_probs(samples)
        p_y = p.mean(0, keepdim=True)
        kl = (p * (p.clamp_min(1e-30).log() - p_y.clamp_min(1e-30).log())).sum(1)
        return math.exp(kl.mean().item())


class DigitsAccuracy(_DigitsMetric):
    __doc__ = "Accuracy of samples for the class they were generated for (higher is better; NaN without labels)."
    name = "digits_acc"
    higher_is_better = True
    needs_labels = True
    min_samples = 1
    implementation = IMPLEMENTATION + ", argmax accuracy vs requested class"

    def score(self, samples, reference, labels):
        if labels is None:
            return float("nan")  # unconditional run: there is no requested class
        labels = torch.as_tensor(labels).long().cpu().reshape(-1)
        if len(labels) != len(samples):
            raise ValueError(f"digits_acc: {len(samples)} samples but {len(labels)} labels")
        _, p = features_and_probs(samples)
        return (p.argmax(1) == labels).double().mean().item()


@METRICS.register("digits_fd", tags=("image", "digits"))
def digits_fd() -> DigitsFD:
    """Frechet distance of digits-CNN features, samples vs reference (lower is better)."""
    return DigitsFD()


@METRICS.register("digits_is", tags=("image", "digits"))
def digits_is() -> DigitsIS:
    """Inception-score analogue with the digits CNN, 1..10 (higher is better)."""
    return DigitsIS()


@METRICS.register("digits_acc", tags=("image", "digits"))
def digits_acc() -> DigitsAccuracy:
    """Accuracy of class-conditional samples for their requested class (higher is better)."""
    return DigitsAccuracy()
