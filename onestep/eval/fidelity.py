"""FID / IS / KID / precision-recall the way the field computes them: through torch-fidelity's own
code path (``torch_fidelity.calculate_metrics``), with samples generated in batches straight into it.

Entry points:

- ``fidelity_metrics(generator_fn, num_samples, reference, metrics=("fid",), ...) -> dict`` where
  ``generator_fn(index_batch (B,) int64) -> images (B, C, H, W)`` (or ``generator_fn(noise (B, z))``
  when ``z_size`` is given); ``generator_fn`` may also be a ready tensor / Dataset of samples.
  Returns ``{"fid", "isc", "isc_std", "kid", "kid_std", "prc_precision", "prc_recall",
  "prc_f_score"}`` restricted to what was asked. ``model_generator_fn(objective, net, dataset,
  nfe=, seed=)`` builds the ``generator_fn`` that reproduces ``onestep eval``'s samples.
- Registered METRICS ``fid``, ``isc``, ``kid``, ``prc`` (kwargs ``feature_extractor``,
  ``weights_path``, ``batch_size``, ``device`` and per-metric settings): ``Metric`` objects with
  ``__call__(samples, reference, labels=None)`` for in-memory samples and
  ``from_generator(generator_fn, num_samples, reference, cache_name=None)`` for the streaming path.

Images: torch-fidelity wants uint8 (N, 3, H, W); float tensors are taken as [-1, 1] and mapped
with round((x + 1) * 127.5) (as ``onestep sample --out x.npz``); one channel is repeated to three.

References (``reference=``): a folder of images (read recursively, so ImageNet-style class
subfolders work; with ``reference_resolution`` every image gets ADM's center crop to the samples'
size); a Dataset returning uint8 (3, H, W) tensors; an image tensor; a torch-fidelity dataset name
(``cifar10-train``, ...); a onestep image dataset (name such as ``digits`` or a Dataset object); a
``.npz`` of FID statistics (mu, sigma) written by ``tools/fid_stats.py`` (FID only); or an ``.npz``
with images ``arr_0`` uint8 (N, H, W, C) (ADM's sample / reference batch layout). ADM's reference
batches (e.g. ``VIRTUAL_imagenet256_labeled.npz``) hold both: FID uses their mu/sigma, computed
with TF Inception pool_3, which only the ``inception-v3-compat`` extractor (2048-d) matches; KID
and PRC use their images. With ``cache_name`` torch-fidelity caches the reference
features/statistics under ``$ONESTEP_CACHE/fidelity_cache`` (see ``reference_cache_name``).

Weights. torch-fidelity downloads Inception (and VGG16 / CLIP) weights into torch hub's checkpoint
directory on first use. Before calling it we check, in order: ``weights_path`` (or, for
``inception-v3-compat``, the env var ``ONESTEP_INCEPTION_WEIGHTS``) must be an existing file,
else ``ConfigError``; otherwise the hub checkpoint file is used when present; otherwise, with
``ONESTEP_OFFLINE=1`` we refuse at once (``ConfigError``), else we probe the download host
(3 s TCP connect, bounded by a thread join so DNS cannot hang us) and download with a 60 s socket
timeout, turning any failure into a one-line ``ConfigError``. The test extractor
``onestep-random-conv`` needs no weights.
"""
from __future__ import annotations

import hashlib
import math
import os
import socket
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Literal
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import DATASETS, METRICS, ConfigError
from .metrics import Metric

ENV_WEIGHTS = "ONESTEP_INCEPTION_WEIGHTS"
ENV_OFFLINE = "ONESTEP_OFFLINE"
RANDOM_CONV = "onestep-random-conv"
DEFAULT_EXTRACTOR = "inception-v3-compat"
PROBE_TIMEOUT_S = 3.0
DOWNLOAD_TIMEOUT_S = 60.0

# Our short names for torch-fidelity's result keys.
RESULT_KEYS = {
    "frechet_inception_distance": "fid",
    "inception_score_mean": "isc",
    "inception_score_std": "isc_std",
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
    "precision": "prc_precision",
    "recall": "prc_recall",
    "f_score": "prc_f_score",
}
METRIC_NAMES = ("fid", "isc", "kid", "prc")

_TF = None  # torch_fidelity module, imported lazily (it pulls in torchvision: ~4 s)


def cache_dir() -> Path:
    """onestep's cache directory (``$ONESTEP_CACHE`` or ``~/.cache/onestep``), as in ``classifier``."""
    from .classifier import cache_dir as _cache_dir  # deferred: classifier and this module import each other's parent

    return _cache_dir()


def _torch_fidelity():
    """Import torch-fidelity once and register ``onestep-random-conv``."""
    global _TF
    if _TF is None:
        import torch_fidelity
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        if RANDOM_CONV not in FEATURE_EXTRACTORS_REGISTRY:
            torch_fidelity.register_feature_extractor(RANDOM_CONV, _random_conv_class(torch_fidelity))
        _TF = torch_fidelity
    return _TF


# ------------------------------------------------------------------------- test feature extractor


def _random_conv_class(tf):
    from torch_fidelity.helpers import vassert

    class RandomConvFeatureExtractor(tf.FeatureExtractorBase):
        """Download-free extractor for tests and smoke runs ("onestep-random-conv v1, seed 0").

        uint8 (B, 3, H, W) -> bilinear resize to 16x16 -> (x - 128) / 128 -> three 3x3 convs with
        fixed He-scaled Gaussian weights from seed 0 (3->32 s1, 32->64 s2, 64->64 s2, ReLU) ->
        global mean, times 8 -> feature "64" (B, 64) (FID / KID / PRC); a fixed random linear map
        of it gives "logits_unbiased" (B, 10) (ISC). Not a perceptual metric: its numbers mean nothing across
        extractors and serve only to exercise torch-fidelity's real code path.
        """

        INPUT_SIZE = 16
        SEED = 0
        FEATURE_SCALE = 8.0  # features ~ 1.8 +- 0.4 on digits

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            g = torch.Generator().manual_seed(self.SEED)

            def conv(cin, cout, stride):
                layer = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
                with torch.no_grad():
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * math.sqrt(2.0 / (cin * 9)))
                    layer.bias.zero_()
                return layer

            self.convs = torch.nn.ModuleList([conv(3, 32, 1), conv(32, 64, 2), conv(64, 64, 2)])
            self.head = torch.nn.Linear(64, 10)
            with torch.no_grad():
                self.head.weight.copy_(torch.randn(10, 64, generator=g) / 2.0)
                self.head.bias.zero_()
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return "64", "logits_unbiased"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits_unbiased", "fid": "64", "kid": "64", "prc": "64"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x):
            vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting uint8 images")
            vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {tuple(x.shape)}")
            h = x.float()
            if h.shape[-2:] != (self.INPUT_SIZE, self.INPUT_SIZE):
                h = F.interpolate(h, size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear", align_corners=False)
            h = (h - 128.0) / 128.0
            for layer in self.convs:
                h = F.relu(layer(h))
            feat = h.mean(dim=(2, 3)) * self.FEATURE_SCALE
            out = {"64": feat, "logits_unbiased": self.head(feat)}
            return tuple(out[k] for k in self.features_list)

    return RandomConvFeatureExtractor


# --------------------------------------------------------------------------------------- images


def to_uint8_rgb(x: Tensor) -> Tensor:
    """(N, C, H, W) uint8, or float in [-1, 1], with C in {1, 3} -> uint8 (N, 3, H, W), same device."""
    x = torch.as_tensor(x).detach()
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


class ImageTensorDataset(torch.utils.data.Dataset):
    """uint8 (N, 3, H, W) images as the Dataset torch-fidelity reads (one tensor per item)."""

    def __init__(self, images: Tensor):
        self.images = to_uint8_rgb(images).cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


class _EmptyDataset(torch.utils.data.Dataset):
    """Stands in for a reference whose statistics are already in torch-fidelity's cache."""

    def __len__(self):
        return 0

    def __getitem__(self, i):  # pragma: no cover - never read on a cache hit
        raise IndexError(i)


def _generator_model_class(tf):
    class GeneratorFnModel(tf.GenerativeModelBase):
        """A ``torch_fidelity.GenerativeModelBase`` around ``generator_fn``.

        Index mode (``z_size=None``): torch-fidelity's noise (B, 1) is ignored and
        ``generator_fn`` gets the sample indices (B,) int64, counting from 0 across batches, so
        sample i depends only on i (not on the batch size); reset ``offset`` before a run.
        Noise mode: ``generator_fn`` gets torch-fidelity's noise (B, z_size), drawn from its
        ``rng_seed`` (sequential draws, so also batch-size independent).
        """

        def __init__(self, generator_fn: Callable[[Tensor], Tensor], z_size: int | None = None):
            super().__init__()
            self.generator_fn = generator_fn
            self.index_mode = z_size is None
            self._z_size = 1 if z_size is None else int(z_size)
            self.offset = 0

        @property
        def z_size(self):
            return self._z_size

        @property
        def z_type(self):
            return "normal"

        @property
        def num_classes(self):
            return 0  # class choice, if any, is generator_fn's business (e.g. label = index % C)

        def forward(self, noise: Tensor) -> Tensor:
            if self.index_mode:
                batch = torch.arange(self.offset, self.offset + noise.shape[0], dtype=torch.int64)
                self.offset += noise.shape[0]
            else:
                batch = noise
            images = to_uint8_rgb(self.generator_fn(batch))
            if images.shape[0] != noise.shape[0]:
                raise ValueError(f"generator_fn returned {images.shape[0]} images for a batch of {noise.shape[0]}")
            return images.to(noise.device)

    return GeneratorFnModel


def model_generator_fn(objective, net, dataset, *, nfe: int, seed: int, device=None,
                       class_id: int | None = None, transform: Callable[[Tensor], Tensor] | None = None
                       ) -> Callable[[Tensor], Tensor]:
    """A ``generator_fn(indices) -> samples (B, C, H, W) in [-1, 1]`` that reproduces
    ``onestep.eval.evaluate.generate``: sample i uses noise seeded by ``sample_seed(seed, i)`` and,
    for class-conditional data, class i % C (or ``class_id``), integrated in ``nfe`` steps, then
    ``transform`` (e.g. VAE decoding). Under torchrun every rank must call it with the same indices:
    the ranks split each batch and all-gather it (``distributed.gather_batch``)."""
    from onestep.eval.evaluate import sample_indices
    from onestep.train.distributed import gather_batch

    device = torch.device(device or _default_device())

    def one_rank(idx: list[int]) -> Tensor:
        x = sample_indices(objective, net, dataset, idx, nfe=nfe, seed=seed, device=device, class_id=class_id)
        return x if transform is None else transform(x)

    def generator_fn(indices: Tensor) -> Tensor:
        return gather_batch(one_rank, [int(i) for i in indices])

    return generator_fn


# -------------------------------------------------------------------------------------- weights


def _offline() -> bool:
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes", "on")


def _download_source(feature_extractor: str) -> tuple[str, str] | None:
    """(url, file name in torch hub's checkpoints dir) of a torch-fidelity extractor's weights,
    None when it needs no download; ("", "") when it downloads in a way we cannot check."""
    if feature_extractor == DEFAULT_EXTRACTOR:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        return URL_INCEPTION_V3, os.path.basename(urlparse(URL_INCEPTION_V3).path)
    if feature_extractor == "vgg16":
        import torchvision

        url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
        return url, os.path.basename(urlparse(url).path)
    if feature_extractor.startswith("clip-"):
        from torch_fidelity.feature_extractor_clip import MODEL_METADATA, MODEL_URLS

        if feature_extractor in MODEL_URLS:
            return MODEL_URLS[feature_extractor], f"{feature_extractor}-{MODEL_METADATA[feature_extractor]['hash']}.pt"
    if feature_extractor.startswith("dinov2-"):
        return "", ""  # torch.hub.load from GitHub: needs the network or weights_path
    return None


def _reachable(host: str, timeout: float | None = None) -> bool:
    """TCP connect to host:443 within ``timeout`` (default PROBE_TIMEOUT_S; DNS included, via a
    daemon thread that is abandoned if it overruns)."""
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


@contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def resolve_weights(feature_extractor: str, weights_path: str | None = None) -> str | None:
    """The ``feature_extractor_weights_path`` to give torch-fidelity (None: its default loader,
    which then finds the file in torch hub's cache). Raises ``ConfigError`` (one line) when the
    weights are neither local nor downloadable, without waiting on the network."""
    source_name = "weights_path"
    if weights_path is None and feature_extractor == DEFAULT_EXTRACTOR and os.environ.get(ENV_WEIGHTS):
        weights_path, source_name = os.environ[ENV_WEIGHTS], ENV_WEIGHTS
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"feature extractor '{feature_extractor}': weights file {path} (from {source_name}) "
                              "does not exist; point it at a local copy of the weights or unset it")
        return str(path)
    source = _download_source(feature_extractor)
    if source is None:
        return None
    url, filename = source
    hint = (f"set {ENV_WEIGHTS} or weights_path" if feature_extractor == DEFAULT_EXTRACTOR else "set weights_path")
    hint += " to a local weights file" + (f", or copy {url} to {Path(torch.hub.get_dir()) / 'checkpoints' / filename}"
                                          if url else "")
    if url:
        local = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if local.is_file():
            return None
    if _offline():
        raise ConfigError(f"feature extractor '{feature_extractor}': weights not found locally and "
                          f"{ENV_OFFLINE}=1 forbids downloading; {hint}")
    host = urlparse(url).hostname if url else "github.com"
    if not _reachable(host):
        raise ConfigError(f"feature extractor '{feature_extractor}': weights not found locally and {host} is "
                          f"unreachable ({PROBE_TIMEOUT_S:g} s); {hint}")
    if url:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                torch.hub.download_url_to_file(url, str(local), progress=False)
        except Exception as exc:
            raise ConfigError(f"feature extractor '{feature_extractor}': downloading {url} failed "
                              f"({type(exc).__name__}: {exc}); {hint}") from None
    return None


# ------------------------------------------------------------------------------------ references


def reference_cache_name(dataset: str, resolution: int) -> str:
    """torch-fidelity cache key of a reference: ``onestep-<dataset>-<resolution>px``. torch-fidelity
    appends the extractor and feature layer to its file names
    (``<key>-<extractor>-stat-fid-<layer>.pt``); ``fidelity_metrics`` appends ``-w<hash>`` for
    custom weights files."""
    return f"onestep-{dataset}-{resolution}px".replace(os.sep, "_")


def _weights_tag(weights: str) -> str:
    return "-w" + hashlib.sha1(str(Path(weights).resolve()).encode()).hexdigest()[:8]


def default_stats_path(dataset: str, resolution: int, feature_extractor: str = DEFAULT_EXTRACTOR,
                       weights_path: str | None = None) -> Path:
    """Where ``tools/fid_stats.py`` writes statistics by default:
    ``$ONESTEP_CACHE/fid_stats/onestep-<dataset>-<resolution>px-<extractor>[-w<hash>].npz``."""
    tag = _weights_tag(weights_path) if weights_path else ""
    return cache_dir() / "fid_stats" / f"{reference_cache_name(dataset, resolution)}-{feature_extractor}{tag}.npz"


def _onestep_dataset_images(dataset) -> tuple[Tensor, str]:
    if getattr(dataset, "kind", None) != "image" or dataset.size is None:
        raise ConfigError(f"reference dataset '{getattr(dataset, 'name', dataset)}' is not a finite image dataset")
    x, _ = dataset.get(torch.arange(dataset.size))
    return x, dataset.name


def _is_npz(reference: Any) -> bool:
    return isinstance(reference, (str, Path)) and str(reference).endswith(".npz")


def npz_arrays(path: str | Path) -> list[str]:
    """The array names in an .npz (read from its index, no data loaded); a one-line error if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return list(f.files)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"reference {path}: cannot read it as .npz ({type(exc).__name__}: {exc})") from None


def npz_images(path: str | Path) -> Tensor:
    """``arr_0`` of an .npz as uint8 (N, 3, H, W): ADM's sample / reference batch layout is uint8
    (N, H, W, C) (what ``onestep sample --out x.npz`` writes); (N, C, H, W) is accepted too."""
    with np.load(path, allow_pickle=False) as f:
        if "arr_0" not in f.files:
            raise ConfigError(f"reference {path}: no images (arr_0) in it; it has {', '.join(f.files)}")
        arr = f["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ConfigError(f"reference {path}: arr_0 must be uint8 images (N, H, W, C), got {arr.dtype} {arr.shape}")
    x = torch.from_numpy(arr)
    return x if arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3) else x.permute(0, 3, 1, 2)


def resolve_reference(reference: Any, resolution: int | None = None) -> tuple[Any, str | None, str]:
    """(torch-fidelity input, default cache name or None, description) for a reference of images.

    A folder is read recursively (ImageNet-style class subfolders work) and, with ``resolution``,
    every image gets ADM's center crop to that size (``onestep.data.images.center_crop_resize``);
    an .npz gives its ``arr_0`` images."""
    from torch_fidelity.registry import DATASETS_REGISTRY

    if isinstance(reference, torch.utils.data.Dataset):
        return reference, None, f"dataset of {len(reference)} images"
    if isinstance(reference, Tensor):
        return ImageTensorDataset(reference), None, f"{len(reference)} images {tuple(reference.shape[1:])}"
    if hasattr(reference, "kind") and hasattr(reference, "get"):  # a onestep Dataset
        x, name = _onestep_dataset_images(reference)
        return ImageTensorDataset(x), reference_cache_name(name, x.shape[-1]), f"{name}: {len(x)} images"
    if isinstance(reference, (str, Path)):
        ref = str(reference)
        if _is_npz(ref):
            x = npz_images(ref)
            return ImageTensorDataset(x), None, f"{ref}: {len(x)} images (arr_0) at {x.shape[-1]}px"
        if ref in DATASETS_REGISTRY:
            return ref, ref, f"torch-fidelity dataset {ref}"
        if os.path.isdir(ref):
            from onestep.data.images import ImageFiles, image_files

            files = image_files(ref)
            if not files:
                raise ConfigError(f"reference folder {ref} holds no image files")
            crop = f", ADM center crop to {resolution}px" if resolution else ""
            return ImageFiles(files, resolution), None, f"folder {ref}: {len(files)} images{crop}"
        if ref in DATASETS:
            x, name = _onestep_dataset_images(DATASETS.build(ref))
            return ImageTensorDataset(x), reference_cache_name(name, x.shape[-1]), f"{name}: {len(x)} images"
        raise ConfigError(f"reference '{ref}' is neither a folder, an .npz (FID statistics or arr_0 images), a "
                          f"torch-fidelity dataset ({', '.join(DATASETS_REGISTRY)}) nor a onestep dataset "
                          f"({', '.join(DATASETS.names())})")
    raise ConfigError(f"reference of type {type(reference).__name__} is not supported")


def uses_stats(reference: Any, metrics) -> bool:
    """True when ``reference`` is an .npz holding FID statistics (mu, sigma) and only FID is asked:
    ADM's reference batches hold both images and statistics, and FID uses the statistics (as ADM's
    evaluator does); KID / PRC need their images."""
    return _is_npz(reference) and list(metrics) == ["fid"] and {"mu", "sigma"} <= set(npz_arrays(reference))


def describe_reference(reference: Any, metric: str = "fid", resolution: int | None = None) -> str:
    """A short description of a user-given reference, for metrics.jsonl rows (loads no images)."""
    if _is_npz(reference):
        if uses_stats(reference, [metric]):
            with np.load(reference, allow_pickle=False) as f:
                extra = [f"{k} {f[k]}" for k in ("num_images", "feature_extractor", "reference") if k in f.files]
                if "arr_0" in f.files and not extra:
                    extra = ["mu/sigma of an ADM reference batch"]
            return f"FID statistics {os.path.abspath(reference)}" + (f" ({', '.join(extra)})" if extra else "")
        return f"images (arr_0) of {os.path.abspath(reference)}"
    if isinstance(reference, (str, Path)) and os.path.isdir(reference):
        return f"folder {os.path.abspath(reference)}" + (f", ADM center crop to {resolution}px" if resolution else "")
    return str(getattr(reference, "name", reference))


def load_stats_npz(path: str | Path) -> dict[str, Any]:
    """mu (D,), sigma (D, D) float64 and metadata from a ``tools/fid_stats.py`` file."""
    with np.load(path, allow_pickle=False) as f:
        out = {k: f[k] for k in f.files if not k.startswith("arr_")}  # ADM reference batches: skip the images
    if "mu" not in out or "sigma" not in out:
        raise ConfigError(f"FID statistics {path}: needs arrays 'mu' and 'sigma', has {', '.join(out)}")
    out["mu"], out["sigma"] = out["mu"].astype(np.float64), out["sigma"].astype(np.float64)
    for key in ("feature_extractor", "feature_layer", "reference"):
        if key in out:
            out[key] = str(out[key])
    return out


def _install_stats(path: str | Path, feature_extractor: str, feature_layer: str, cache_root: Path) -> str:
    """Put a .npz's (mu, sigma) into torch-fidelity's statistics cache; returns its cache name."""
    stats = load_stats_npz(path)
    for key, want in (("feature_extractor", feature_extractor), ("feature_layer", feature_layer)):
        if key in stats and stats[key] != want:
            raise ConfigError(f"FID statistics {path} were computed with {key} '{stats[key]}', not '{want}'")
    dim = stats["mu"].shape[0]
    if feature_layer.isdigit() and int(feature_layer) != dim or stats["sigma"].shape != (dim, dim):
        raise ConfigError(f"FID statistics {path} are {dim}-d (sigma {stats['sigma'].shape}); feature extractor "
                          f"'{feature_extractor}' layer '{feature_layer}' gives {feature_layer}-d features")
    digest = hashlib.sha1(stats["mu"].tobytes() + stats["sigma"].tobytes()).hexdigest()[:12]
    name = f"onestep-npz-{digest}"
    target = cache_root / f"{name}-{feature_extractor}-stat-fid-{feature_layer}.pt"
    if not target.exists():
        from torch_fidelity.utils_torch import torch_atomic_save

        cache_root.mkdir(parents=True, exist_ok=True)
        # torch-fidelity's own statistics: mu float32 (mean of float32 features), sigma float64 (np.cov).
        torch_atomic_save({"mu": stats["mu"].astype(np.float32), "sigma": stats["sigma"]}, str(target))
    return name


def reference_statistics(reference: Any, *, feature_extractor: str = DEFAULT_EXTRACTOR,
                         weights_path: str | None = None, batch_size: int = 64, device=None,
                         resolution: int | None = None, verbose: bool = False) -> dict[str, Any]:
    """FID statistics of ``reference`` through torch-fidelity's feature extraction and
    ``fid_features_to_statistics``: {mu (D,), sigma (D, D) float64, num_images, resolution,
    feature_extractor, feature_layer, reference, weights, torch_fidelity_version}. A folder
    reference is ADM-center-cropped to ``resolution`` when given."""
    _torch_fidelity()
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id, prepare_input_from_id

    cuda, device_ctx = _device_context(device or _default_device())
    weights = resolve_weights(feature_extractor, weights_path)
    layer = feature_layer(feature_extractor, "fid")
    input2, _, description = resolve_reference(reference, resolution)
    kwargs = dict(input2=input2, fid=True, feature_extractor=feature_extractor, feature_extractor_weights_path=weights,
                  batch_size=batch_size, cuda=cuda, verbose=verbose, save_cpu_ram=True, datasets_download=False)
    with device_ctx:
        try:
            first = prepare_input_from_id(2, **kwargs)[0]
            extractor = create_feature_extractor(feature_extractor, [layer], **kwargs)
            features = extract_featuresdict_from_input_id(2, extractor, **kwargs)[layer]
        except ValueError as exc:
            if not _raised_by_torch_fidelity(exc):
                raise
            raise ConfigError(f"torch-fidelity: {exc}") from None
    stats = fid_features_to_statistics(features)
    return {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64),
            "num_images": len(features), "resolution": int(first.shape[-1]), "feature_extractor": feature_extractor,
            "feature_layer": layer, "reference": description,
            "weights": "default" if weights is None else Path(weights).name, "torch_fidelity_version": _tf_version()}


def save_stats_npz(stats: dict[str, Any], path: str | Path) -> Path:
    """Write ``reference_statistics`` output as .npz (atomically; strings as 0-d unicode arrays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in stats.items()})
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------ the metrics


def _device_context(device):
    device = torch.device(device)
    if device.type == "cuda":
        return True, (torch.cuda.device(device) if device.index is not None else nullcontext())
    if device.type != "cpu":
        raise ConfigError(f"torch-fidelity runs on 'cpu' or 'cuda', got device '{device}'")
    return False, nullcontext()


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def feature_layer(feature_extractor: str, metric: str) -> str:
    """The extractor's default feature layer for ``metric`` (torch-fidelity's choice)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    _torch_fidelity()
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ConfigError(f"unknown feature extractor '{feature_extractor}'; known: "
                          f"{', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}")
    return FEATURE_EXTRACTORS_REGISTRY[feature_extractor].get_default_feature_layer_for_metric(metric)


def fidelity_metrics(generator_fn: Callable[[Tensor], Tensor] | Tensor | torch.utils.data.Dataset,
                     num_samples: int | None, reference: Any = None, metrics=("fid",), *,
                     feature_extractor: str = DEFAULT_EXTRACTOR, weights_path: str | None = None,
                     batch_size: int = 64, device=None, cache_name: str | None = None,
                     z_size: int | None = None, seed: int = 2020, kid_subset_size: int = 1000,
                     kid_subsets: int = 100, isc_splits: int = 10, prc_neighborhood: int = 3,
                     cache_root: str | Path | None = None, reference_resolution: int | None = None,
                     verbose: bool = False) -> dict[str, float]:
    """Compute torch-fidelity ``metrics`` (subset of fid, isc, kid, prc) of generated images.

    generator_fn: ``f(indices (B,) int64) -> images (B, C, H, W)`` (uint8, or float in [-1, 1];
        C = 1 or 3), called on consecutive index batches 0..num_samples-1 of size ``batch_size``;
        with ``z_size`` it is called on torch-fidelity's N(0, I) noise (B, z_size) instead. May
        also be a ready tensor or Dataset of samples (``num_samples`` then ignored).
    reference: see the module docstring; not needed for ``isc`` alone.
    cache_name: torch-fidelity cache key for the reference's features/statistics (defaults to
        ``reference_cache_name`` for onestep datasets, the dataset name for torch-fidelity's own;
        None, i.e. no caching, for tensors and folders). A stale cache is not detected: pick a
        new name when the reference changes (e.g. a different subset).
    seed: torch-fidelity's ``rng_seed`` (noise mode, KID subsets, ISC split shuffling).
    kid_subset_size is clamped to the number of samples / reference images.
    reference_resolution: a folder reference is ADM-center-cropped to this size (the samples').
    Returns floats keyed fid, isc, isc_std, kid, kid_std, prc_precision, prc_recall, prc_f_score.
    """
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    bad = [m for m in metrics if m not in METRIC_NAMES]
    if bad or not metrics:
        raise ConfigError(f"unknown torch-fidelity metric(s) {', '.join(bad) or '(none)'}; "
                          f"allowed: {', '.join(METRIC_NAMES)}")
    tf = _torch_fidelity()
    cuda, device_ctx = _device_context(device or _default_device())
    weights = resolve_weights(feature_extractor, weights_path)
    cache_root = Path(cache_root) if cache_root is not None else cache_dir() / "fidelity_cache"

    kwargs: dict[str, Any] = dict(
        fid="fid" in metrics, isc="isc" in metrics, kid="kid" in metrics, prc="prc" in metrics,
        feature_extractor=feature_extractor, feature_extractor_weights_path=weights,
        batch_size=batch_size, cuda=cuda, rng_seed=seed, verbose=verbose,
        isc_splits=isc_splits, kid_subsets=kid_subsets, prc_neighborhood=prc_neighborhood,
        cache=True, cache_root=str(cache_root), save_cpu_ram=True, datasets_download=False,
    )

    # Input 1: a generative model (streamed in batches) or ready samples.
    if callable(generator_fn) and not isinstance(generator_fn, (Tensor, torch.utils.data.Dataset)):
        if not num_samples or num_samples < 1:
            raise ConfigError(f"fidelity metrics: num_samples must be >= 1, got {num_samples}")
        model = _generator_model_class(tf)(generator_fn, z_size)
        kwargs.update(input1=model, input1_model_num_samples=int(num_samples))
        n1 = int(num_samples)
    else:
        data = generator_fn if isinstance(generator_fn, torch.utils.data.Dataset) else ImageTensorDataset(generator_fn)
        kwargs.update(input1=data)
        n1 = len(data)

    # Input 2: the reference (not needed by isc alone).
    needs_reference = any(m in metrics for m in ("fid", "kid", "prc"))
    if needs_reference:
        if reference is None:
            raise ConfigError(f"fidelity metrics {', '.join(metrics)} need a reference")
        if _is_npz(reference) and metrics != ["fid"] and "arr_0" not in npz_arrays(reference):
            raise ConfigError(f"a .npz of FID statistics ({reference}) serves 'fid' only, not {', '.join(metrics)}")
        if uses_stats(reference, metrics):
            layer = feature_layer(feature_extractor, "fid")
            name = _install_stats(reference, feature_extractor, layer, cache_root)
            kwargs.update(input2=_EmptyDataset(), input2_cache_name=name)
        else:
            input2, default_name, _ = resolve_reference(reference, reference_resolution)
            name = cache_name or default_name
            if name is not None and weights is not None:  # custom weights: keep their cache apart
                name += _weights_tag(weights)
            # (torch-fidelity names the cache of its own registered datasets itself.)
            kwargs.update(input2=input2, input2_cache_name=name)
            if "kid" in metrics and not isinstance(input2, str):
                kwargs["kid_subset_size"] = max(2, min(kid_subset_size, n1, len(input2)))
    if "kid" in metrics and "kid_subset_size" not in kwargs:
        kwargs["kid_subset_size"] = max(2, min(kid_subset_size, n1))

    with device_ctx:
        try:
            raw = tf.calculate_metrics(**kwargs)
        except ValueError as exc:
            if not _raised_by_torch_fidelity(exc):
                raise
            raise ConfigError(f"torch-fidelity: {exc}") from None  # its vassert: a one-line user error
    return {RESULT_KEYS[k]: float(v) for k, v in raw.items() if k in RESULT_KEYS}


def _raised_by_torch_fidelity(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "torch_fidelity" in tb.tb_frame.f_code.co_filename


class FidelityMetric(Metric):
    """One torch-fidelity metric as a onestep ``Metric`` (images only).

    ``metric(samples, reference, labels=None)``: samples / reference as image tensors (float in
    [-1, 1] or uint8) or anything ``fidelity_metrics`` takes as a reference.
    ``metric.from_generator(generator_fn, num_samples, reference, cache_name=None)``: stream
    samples from ``generator_fn`` straight into torch-fidelity. ``last_results`` keeps every
    number of the last call (e.g. isc_std, prc_recall).
    """

    needs_labels = False

    def __init__(self, metric: str, key: str, *, feature_extractor: str, weights_path: str | None,
                 batch_size: int, device: str | None, options: dict[str, Any], higher_is_better: bool,
                 describe: str):
        self.name, self.key = metric, key
        self.higher_is_better = higher_is_better
        self.feature_extractor, self.weights_path = feature_extractor, weights_path
        self.batch_size, self.device, self.options = batch_size, device, options
        self.last_results: dict[str, float] = {}
        weights = "" if weights_path is None else f", weights {Path(weights_path).name}"
        if feature_extractor == DEFAULT_EXTRACTOR and weights_path is None and os.environ.get(ENV_WEIGHTS):
            weights = f", weights {Path(os.environ[ENV_WEIGHTS]).name}"
        self.implementation = (f"torch-fidelity {_tf_version()} {describe}, {feature_extractor}{weights}, "
                               "uint8 round((x+1)*127.5)")

    def _run(self, generator_fn, num_samples, reference, **extra) -> float:
        self.last_results = fidelity_metrics(
            generator_fn, num_samples, reference, (self.name,), feature_extractor=self.feature_extractor,
            weights_path=self.weights_path, batch_size=self.batch_size, device=self.device,
            **self.options, **extra)
        return self.last_results[self.key]

    def __call__(self, samples, reference=None, labels=None) -> float:
        return self._run(samples, None, reference)

    def from_generator(self, generator_fn, num_samples: int, reference=None, *, cache_name: str | None = None,
                       z_size: int | None = None, seed: int = 2020, reference_resolution: int | None = None) -> float:
        """Stream ``num_samples`` images of ``generator_fn`` (see ``fidelity_metrics``) into torch-fidelity."""
        return self._run(generator_fn, num_samples, reference, cache_name=cache_name, z_size=z_size, seed=seed,
                         reference_resolution=reference_resolution)


def _tf_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch-fidelity")
    except Exception:  # pragma: no cover
        return "?"


def _check_common(name: str, batch_size: int, device: str | None) -> None:
    if batch_size < 1:
        raise ConfigError(f"metric '{name}': key 'batch_size' must be >= 1, got {batch_size}")
    if device is not None and torch.device(device).type not in ("cpu", "cuda"):
        raise ConfigError(f"metric '{name}': key 'device' must be cpu or cuda, got {device!r}")


@METRICS.register("fid", tags=("image", "torch-fidelity"))
def fid(feature_extractor: str = DEFAULT_EXTRACTOR, weights_path: str | None = None, batch_size: int = 64,
        device: str | None = None) -> FidelityMetric:
    """FID through torch-fidelity (lower is better); Inception by default, see ONESTEP_INCEPTION_WEIGHTS."""
    _check_common("fid", batch_size, device)
    return FidelityMetric("fid", "fid", feature_extractor=feature_extractor, weights_path=weights_path,
                          batch_size=batch_size, device=device, options={}, higher_is_better=False,
                          describe="FID (default feature layer)")


@METRICS.register("isc", tags=("image", "torch-fidelity"))
def isc(feature_extractor: str = DEFAULT_EXTRACTOR, weights_path: str | None = None, batch_size: int = 64,
        device: str | None = None, splits: int = 10) -> FidelityMetric:
    """Inception score through torch-fidelity, mean over ``splits`` (higher is better)."""
    _check_common("isc", batch_size, device)
    if splits < 1:
        raise ConfigError(f"metric 'isc': key 'splits' must be >= 1, got {splits}")
    return FidelityMetric("isc", "isc", feature_extractor=feature_extractor, weights_path=weights_path,
                          batch_size=batch_size, device=device, options={"isc_splits": splits},
                          higher_is_better=True, describe=f"IS ({splits} splits)")


@METRICS.register("kid", tags=("image", "torch-fidelity"))
def kid(feature_extractor: str = DEFAULT_EXTRACTOR, weights_path: str | None = None, batch_size: int = 64,
        device: str | None = None, subset_size: int = 1000, subsets: int = 100) -> FidelityMetric:
    """KID through torch-fidelity, cubic polynomial kernel (lower is better).

    The subset size is clamped to the number of samples and reference images."""
    _check_common("kid", batch_size, device)
    if subset_size < 2 or subsets < 1:
        raise ConfigError(f"metric 'kid': needs subset_size >= 2 and subsets >= 1, got {subset_size}, {subsets}")
    return FidelityMetric("kid", "kid", feature_extractor=feature_extractor, weights_path=weights_path,
                          batch_size=batch_size, device=device,
                          options={"kid_subset_size": subset_size, "kid_subsets": subsets}, higher_is_better=False,
                          describe=f"KID (poly3, {subsets} subsets of min({subset_size}, N))")


@METRICS.register("prc", tags=("image", "torch-fidelity"))
def prc(feature_extractor: str = "vgg16", weights_path: str | None = None, batch_size: int = 64,
        device: str | None = None, neighborhood: int = 3,
        component: Literal["precision", "recall", "f_score"] = "f_score") -> FidelityMetric:
    """Precision/recall/F-score through torch-fidelity, VGG16 features by default (higher is better).

    Reports ``component`` (Kynkaanniemi et al. 2019, k = ``neighborhood``); all three are in
    ``last_results``."""
    _check_common("prc", batch_size, device)
    if neighborhood < 1:
        raise ConfigError(f"metric 'prc': key 'neighborhood' must be >= 1, got {neighborhood}")
    return FidelityMetric("prc", f"prc_{component}", feature_extractor=feature_extractor, weights_path=weights_path,
                          batch_size=batch_size, device=device, options={"prc_neighborhood": neighborhood},
                          higher_is_better=True, describe=f"PRC {component} (k={neighborhood})")
