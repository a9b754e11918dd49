"""Feature-extractor weights: local files first, then torch hub's cache, then a bounded download.

``weights_path`` (or, for ``inception-v3-compat``, the env var ``ONESTEP_INCEPTION_WEIGHTS``) must be
an existing file, else ``ConfigError``; otherwise the hub checkpoint file is used when present;
otherwise, with ``ONESTEP_OFFLINE=1`` we refuse at once (``ConfigError``), else we probe the download
host (3 s TCP connect, bounded by a thread join so DNS cannot hang us) and download with a 60 s socket
timeout, turning any failure into a one-line ``ConfigError``. ``onestep-random-conv`` needs none.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

from onestep.eval.fidelity.extractors import DEFAULT_EXTRACTOR
from onestep.registry import ConfigError

ENV_WEIGHTS = "ONESTEP_INCEPTION_WEIGHTS"
ENV_OFFLINE = "ONESTEP_OFFLINE"
PROBE_TIMEOUT_S = 3.0
DOWNLOAD_TIMEOUT_S = 60.0


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
            raise ConfigError(
                f"feature extractor '{feature_extractor}': weights file {path} (from {source_name}) "
                "does not exist; point it at a local copy of the weights or unset it"
            )
        check_weights_file(feature_extractor, path)
        return str(path)
    source = _download_source(feature_extractor)
    if source is None:
        return None
    url, filename = source
    hint = f"set {ENV_WEIGHTS} or weights_path" if feature_extractor == DEFAULT_EXTRACTOR else "set weights_path"
    hint += " to a local weights file" + (
        f", or copy {url} to {Path(torch.hub.get_dir()) / 'checkpoints' / filename}" if url else ""
    )
    if url:
        local = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if local.is_file():
            check_weights_file(feature_extractor, local)
            return None
    if _offline():
        raise ConfigError(
            f"feature extractor '{feature_extractor}': weights not found locally and "
            f"{ENV_OFFLINE}=1 forbids downloading; {hint}"
        )
    host = urlparse(url).hostname if url else "github.com"
    if not _reachable(host):
        raise ConfigError(
            f"feature extractor '{feature_extractor}': weights not found locally and {host} is "
            f"unreachable ({PROBE_TIMEOUT_S:g} s); {hint}"
        )
    if url:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                torch.hub.download_url_to_file(url, str(local), progress=False)
        except Exception as exc:
            raise ConfigError(
                f"feature extractor '{feature_extractor}': downloading {url} failed "
                f"({type(exc).__name__}: {exc}); {hint}"
            ) from None
    return None


# A parameter every copy of the extractor's weights must hold, and its shape.
_EXPECTED_KEY = {DEFAULT_EXTRACTOR: ("fc.weight", (1008, 2048))}


def check_weights_file(feature_extractor: str, path: Path) -> None:
    """Read a local weights file the safe way (``weights_only``) before torch-fidelity loads it (it does
    not use ``weights_only``): a truncated, garbled or foreign file, or one that would run code, is one
    line naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError / ... for bad files
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ConfigError(
            f"feature extractor '{feature_extractor}': {path} is not a readable weights file "
            f"(expected a torch state dict; {type(exc).__name__}: {detail})"
        ) from None
    if feature_extractor in _EXPECTED_KEY:
        key, shape = _EXPECTED_KEY[feature_extractor]
        value = state.get(key) if isinstance(state, dict) else None
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            raise ConfigError(
                f"feature extractor '{feature_extractor}': {path} is not the Inception-v3 weights "
                f"torch-fidelity expects (no '{key}' of shape {shape} in it)"
            )


def weights_tag(weights: str) -> str:
    return "-w" + hashlib.sha1(str(Path(weights).resolve()).encode()).hexdigest()[:8]
