"""Reference classifiers: small CNNs the toolkit trains once per labeled image set and then uses to
score generated images of that set (the small-image convention: FD in the classifier's feature
space, an Inception-score analogue, class accuracy of conditional samples, k-NN precision/recall).

A ``ClassifierSpec`` names the dataset family it judges (``digits``, ``fashion_mnist``, ``mnist``),
its network, the input preparation and a fixed training schedule. ``load_classifier(name, dataset)``
returns the copy shipped in ``onestep/eval/classifiers/weights/`` where there is one (Fashion-MNIST's:
the benchmark's judge, the same on every machine), else the cached classifier, or trains it
deterministically on the family's train split (seeded generators, one CPU thread, a progress bar
on stderr), records its test-split accuracy and the sha256 of its weights, and saves it atomically
to ``$ONESTEP_CACHE/<name>_classifier_v<version>.pt`` (default ``~/.cache/onestep/``). Files are
read with ``torch.load(weights_only=True)``; a cached file that is corrupt, of another version or
whose weights do not hash to what it records is retrained with a
one-line warning. ``Loaded.implementation`` ("onestep fashion_mnist-CNN v1, test acc 0.9123, sha256
1a2b3c4d5e6f") goes into every metric row, so a number always says which classifier made it.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestep.registry import ConfigError
from onestep.utils.atomic import atomic_write
from onestep.utils.cache import cache_dir


@dataclass(frozen=True)
class ClassifierSpec:
    """A reference classifier for one dataset family.

    ``build_net()`` -> a module with ``features(x)`` (N, feature_dim) and ``head(features)`` logits;
    ``prepare(x)``: (N, C, S, S) images in [-1, 1] at any of the family's resolutions -> the net's
    input; ``splits(dataset, split)`` -> (x, y) of the family's ``split`` ("train"/"test"), labels
    included, read from where ``dataset`` (a dataset of the family, or None) reads its data;
    ``augment(x, generator)`` the training augmentation."""

    name: str
    title: str
    version: int
    feature_dim: int
    build_net: Callable[[], nn.Module]
    prepare: Callable[[Tensor], Tensor]
    splits: Callable[[Any, str], tuple[Tensor, Tensor]]
    augment: Callable[[Tensor, torch.Generator], Tensor]
    epochs: int
    batch_size: int
    lr: float
    min_test_accuracy: float
    seed: int = 0
    num_classes: int = 10

    @property
    def file_name(self) -> str:
        return f"{self.name}_classifier_v{self.version}.pt"

    def path(self) -> Path:
        return cache_dir() / self.file_name


@dataclass
class Loaded:
    """A ready classifier (eval mode, CPU, no grad) with what identifies it."""

    spec: ClassifierSpec
    net: nn.Module
    test_accuracy: float
    sha256: str
    path: Path
    info: dict = field(default_factory=dict)

    @property
    def implementation(self) -> str:
        return (
            f"onestep {self.spec.title} v{self.spec.version}, test acc {self.test_accuracy:.4f}, "
            f"sha256 {self.sha256[:12]}"
        )

    @torch.no_grad()
    def features_and_probs(self, x: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
        """Penultimate features (N, feature_dim) and softmax p(y|x) (N, classes), float64."""
        x = self.spec.prepare(x)
        feats, probs = [], []
        for start in range(0, len(x), batch_size):
            f = self.net.features(x[start : start + batch_size])
            feats.append(f.double())
            probs.append(self.net.head(f).double().softmax(1))
        return torch.cat(feats), torch.cat(probs)


SPECS: dict[str, ClassifierSpec] = {}
_LOADED: dict[str, Loaded] = {}


def register(spec: ClassifierSpec) -> ClassifierSpec:
    if spec.name in SPECS:
        raise ValueError(f"reference classifier '{spec.name}' is registered twice")
    SPECS[spec.name] = spec
    return spec


def spec_of(name: str) -> ClassifierSpec:
    if name not in SPECS:
        raise ConfigError(f"no reference classifier '{name}'; known: {', '.join(sorted(SPECS))}")
    return SPECS[name]


def family_of(dataset) -> str | None:
    """The reference-classifier name that judges ``dataset`` (its family), or None."""
    family = getattr(dataset, "family", None)
    return family if family in SPECS else None


def weights_sha256(state_dict: dict[str, Tensor]) -> str:
    """sha256 over the weights (names, dtypes, shapes, bytes in name order): independent of how the
    file was serialised."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    net.eval()
    hits = sum(
        (net.head(net.features(x[i : i + batch_size])).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    return hits / max(len(x), 1)


def warn(message: str) -> None:
    print(f"onestep: warning: {message}", file=sys.stderr, flush=True)


def train_classifier(spec: ClassifierSpec, dataset=None, *, progress: bool = True) -> tuple[nn.Module, float, float]:
    """Train ``spec``'s net on its train split; returns (net, test accuracy, seconds).

    Deterministic for a given torch build: its own generators (the global RNG is forked, so callers'
    random streams are untouched) and one thread (the result does not depend on the thread count)."""
    x, y = spec.splits(dataset, "train")
    x_test, y_test = spec.splits(dataset, "test")
    x, x_test = spec.prepare(x), spec.prepare(x_test)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            net = spec.build_net()
            g = torch.Generator().manual_seed(spec.seed)
            opt = torch.optim.Adam(net.parameters(), lr=spec.lr)
            steps_per_epoch = math.ceil(len(x) / spec.batch_size)
            total = spec.epochs * steps_per_epoch
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=total)
            with _progress(progress, f"training the {spec.name} reference classifier (once)", total) as advance:
                for _ in range(spec.epochs):
                    net.train()
                    perm = torch.randperm(len(x), generator=g)
                    for start in range(0, len(x), spec.batch_size):
                        idx = perm[start : start + spec.batch_size]
                        loss = F.cross_entropy(net.head(net.features(spec.augment(x[idx], g))), y[idx])
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
                        advance()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    return net, accuracy(net, x_test, y_test), time.perf_counter() - t0


class _progress:
    """A rich progress bar on stderr (a no-op when ``enabled`` is False)."""

    def __init__(self, enabled: bool, title: str, total: int):
        self.enabled, self.title, self.total = enabled, title, total

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            "{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.bar.__enter__()
        task = self.bar.add_task(self.title, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


# Classifiers shipped with the package (``<name>_classifier_v<version>.pt``): a benchmark's scores must
# not depend on the machine that trained its judge. Retrained from the same seed, the Fashion-MNIST CNN
# came out with other weights on another CPU (oneDNN's convolution kernels differ by instruction set),
# so the scoring classifier ships and is preferred to the cache.
SHIPPED_DIR = Path(__file__).with_name("weights")


def shipped_path(spec: ClassifierSpec) -> Path | None:
    """The package's copy of ``spec``'s classifier, or None when none ships."""
    path = SHIPPED_DIR / spec.file_name
    return path if path.is_file() else None


def _read_cache(spec: ClassifierSpec, path: Path, then: str = "retraining it") -> Loaded | None:
    """The cached classifier, or None (with a one-line warning) when the file is unusable."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "state_dict" not in blob:
            raise ValueError("not a classifier file")
        if blob.get("version") != spec.version:
            raise ValueError(f"version {blob.get('version')}, expected {spec.version}")
        net = spec.build_net()
        net.load_state_dict(blob["state_dict"])
        sha = weights_sha256(net.state_dict())
        if blob.get("sha256") not in (None, sha):
            raise ValueError("its weights do not match the sha256 it records")
        return Loaded(spec, net, float(blob["test_accuracy"]), sha, path, info=dict(blob.get("info") or {}))
    except Exception as exc:  # corrupt, truncated, foreign or tampered: retrain
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        warn(f"reference classifier file {path} is unusable ({type(exc).__name__}: {first}); {then}")
        return None


def load_classifier(name: str, dataset=None, *, train_if_missing: bool = True, progress: bool = True) -> Loaded:
    """The ``name`` reference classifier: the copy shipped with the package, else the cached one, else
    trained (on ``dataset``'s family data) and cached."""
    spec = spec_of(name)
    path = spec.path()
    loaded = None
    # The shipped copy first; the cache when none ships or it does not load.
    for source, then in ((shipped_path(spec), "using the cache instead"), (path, "retraining it")):
        if source is None:
            continue
        key = str(source.resolve())
        if key in _LOADED:
            return _LOADED[key]
        loaded = _read_cache(spec, source, then) if source.exists() else None
        if loaded is not None:
            break
    if loaded is None:
        if not train_if_missing:
            raise ConfigError(f"reference classifier cache {path} is missing")
        net, acc, seconds = train_classifier(spec, dataset, progress=progress)
        if acc < spec.min_test_accuracy:
            raise ConfigError(
                f"the {name} reference classifier reached only {acc:.4f} test accuracy "
                f"(< {spec.min_test_accuracy}); its data may be wrong"
            )
        sha = weights_sha256(net.state_dict())
        info = {"train_seconds": round(seconds, 1), "torch": str(torch.__version__)}
        blob = {
            "version": spec.version,
            "seed": spec.seed,
            "test_accuracy": acc,
            "sha256": sha,
            "info": info,
            "state_dict": net.state_dict(),
        }
        atomic_write(path, lambda f: torch.save(blob, f))
        loaded = Loaded(spec, net, acc, sha, path, info=info)
    loaded.net.eval().requires_grad_(False)
    _LOADED[key] = loaded
    return loaded
