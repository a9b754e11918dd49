"""The ``onestep`` checkpoint format: this toolkit's own run directories, checkpoints and exports.

A path in this format is one of (told apart by what is there):

* a run directory ``RUN`` (``config.yaml`` + ``checkpoints/last.pt``): its last checkpoint;
* a checkpoint file (``RUN/checkpoints/*.pt``: ``{"format": "onestep-checkpoint/1", "step", "model",
  "ema", "optimizer", "config", ...}``), read with ``torch.load(weights_only=True)``;
* an export directory ``DIR`` (``model.safetensors`` + ``config.yaml``, written by ``onestep export``):
  the weights are read with safetensors and the config with a safe YAML loader, no pickle at all.

The backbone is rebuilt from the run's resolved config (``backbone`` with its data-derived
``input_shape`` / ``num_classes``) and gets the EMA weights by default (``use_ema=False``: the raw
ones; a file without EMA weights gives its raw ones either way). A plain path without a
``FORMAT:`` prefix means this format, wherever a checkpoint is taken (``objective.teacher``,
``train.init_from``, ``onestep sample`` / ``eval``, ``onestep.load_model``).

``load_run`` rebuilds the whole model for sampling and evaluation: data (or, when the data files are
not here, a stand-in with its shape, classes, latent scale and VAE: ``formats.data``), backbone,
objective (without its teacher), step.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..build import build_backbone, build_dataset, build_objective
from ..config import Config, from_dict
from ..data.base import Dataset
from ..registry import FORMATS, ConfigError, DataNotFound
from ..utils.checkpoint import read_checkpoint_file
from ..utils.rundir import RunDir, resolve_checkpoint
from .base import CheckpointFormat, check_backbone_state
from .data import stand_in_data
from .teachers import freeze

__all__ = [
    "EXPORT_WEIGHTS",
    "EXPORT_CONFIG",
    "EXPORT_MANIFEST",
    "EXPORT_CARD",
    "file_sha256",
    "EXPORT_FORMAT",
    "LoadedRun",
    "OnestepCheckpoint",
    "OnestepFormat",
    "is_export",
    "read_onestep",
    "config_of",
    "build_net",
    "load_run",
]

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"
EXPORT_MANIFEST = "manifest.json"
EXPORT_CARD = "README.md"
EXPORT_FORMAT = "onestep-export/1"


@dataclass
class LoadedRun:
    """A model ready to sample: ``cfg`` (None for public checkpoints), the backbone-contract ``net``
    (eval mode, frozen), its ``objective`` (the sampler), ``dataset`` (or its stand-in), the
    training ``step`` (None when unknown), ``path`` (the checkpoint file or directory read),
    ``spec`` as given and the ``format`` name."""

    cfg: Config | None
    net: nn.Module
    objective: Any
    dataset: Dataset
    step: int | None
    path: Path
    spec: str = ""
    format: str = "onestep"


@dataclass
class OnestepCheckpoint:
    """What one onestep checkpoint holds: the resolved config as written (with ``meta``), one set of
    backbone weights, the step, the file or export directory read, its kind and which weights."""

    raw_config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    step: int
    path: Path
    kind: str  # "checkpoint" (a run directory's or a checkpoint file) or "export"
    weights_name: str  # "ema" or "model"


def is_export(path: str | Path) -> bool:
    """An export directory: ``model.safetensors`` and ``config.yaml`` side by side."""
    path = Path(path)
    return path.is_dir() and (path / EXPORT_WEIGHTS).is_file() and (path / EXPORT_CONFIG).is_file()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_manifest(path: Path) -> None:
    """Exports record the sha256 of their weights and config (``manifest.json``): a truncated, garbled
    or edited file is refused before it is read."""
    manifest = path / EXPORT_MANIFEST
    if not manifest.is_file():
        return  # exports written before manifests existed
    try:
        sums = json.loads(manifest.read_text())
        if not isinstance(sums, dict):
            raise ValueError("not a mapping")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{manifest}: not a readable export manifest ({type(exc).__name__}: {exc})") from None
    for name, digest in sums.items():
        if name in (EXPORT_WEIGHTS, EXPORT_CONFIG) and file_sha256(path / name) != digest:
            raise ConfigError(
                f"{path / name}: does not match its sha256 in {EXPORT_MANIFEST} (the file is corrupt "
                f"or was changed after export)"
            )


def _read_export(path: Path, use_ema: bool) -> OnestepCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_manifest(path)
    raw = RunDir(path).read_config()
    export = (raw.get("meta") or {}).get("export") or {}
    weights_name = str(export.get("weights", "ema"))
    if not use_ema and weights_name == "ema":
        raise ConfigError(
            f"{path}: this export holds only the EMA weights (it was exported without --no-ema); "
            f"the raw weights are in the run it came from"
        )
    try:
        weights = load_file(str(path / EXPORT_WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{path / EXPORT_WEIGHTS}: not a readable safetensors file ({exc})") from None
    return OnestepCheckpoint(raw, weights, int(export.get("step", 0)), path, "export", weights_name)


def read_onestep(path: str | Path, *, use_ema: bool = True) -> OnestepCheckpoint:
    """Read a run directory, checkpoint file or export directory (module docstring)."""
    path = Path(path)
    if is_export(path):
        return _read_export(path, use_ema)
    if path.is_dir() and not RunDir(path).last_checkpoint.is_file() and (path / EXPORT_CONFIG).is_file():
        raise ConfigError(
            f"{path}: neither a run directory (no {RunDir.CHECKPOINTS}/{RunDir.LAST}) nor an export "
            f"(no {EXPORT_WEIGHTS})"
        )
    ckpt = resolve_checkpoint(path)
    state = read_checkpoint_file(ckpt)
    use = "ema" if use_ema and state.get("ema") is not None else "model"
    return OnestepCheckpoint(dict(state["config"]), dict(state[use]), int(state["step"]), ckpt, "checkpoint", use)


def config_of(raw: dict[str, Any]) -> Config:
    """The Config of a resolved config as written (``meta`` dropped)."""
    return from_dict({k: v for k, v in raw.items() if k != "meta"})


def _load_weights(net: nn.Module, weights: dict[str, torch.Tensor], where: Any) -> nn.Module:
    check_backbone_state(weights, net, str(where), source="the checkpoint")
    net.load_state_dict(weights)
    return net


def build_net(ckpt: OnestepCheckpoint, cfg: Config | None = None, dataset: Dataset | None = None) -> nn.Module:
    """The checkpoint's backbone with its weights (train mode, on the CPU); built from the resolved
    config, whose backbone section names the data-derived input_shape / num_classes."""
    cfg = cfg or config_of(ckpt.raw_config)
    return _load_weights(build_backbone(cfg, dataset), ckpt.weights, ckpt.path)


def _data(cfg: Config, net: nn.Module) -> Dataset:
    """The run's dataset, or its stand-in when the data files are not here."""
    try:
        return build_dataset(cfg)
    except DataNotFound as exc:
        return stand_in_data(
            tuple(net.input_shape),
            int(getattr(net, "num_classes", 0) or 0),
            data=cfg.data,
            reason=str(exc).splitlines()[0],
        )


def load_run(path: str | Path, *, use_ema: bool = True, device: Any = "cpu") -> LoadedRun:
    """Rebuild the data (or its stand-in), backbone (EMA weights by default) and objective of a run
    directory, checkpoint file or export directory."""
    ckpt = read_onestep(path, use_ema=use_ema)
    cfg = config_of(ckpt.raw_config)
    net = build_net(ckpt, cfg)
    dataset = _data(cfg, net)
    if tuple(dataset.shape) != tuple(net.input_shape):
        raise ConfigError(
            f"{path}: the backbone takes shape {tuple(net.input_shape)} but the data "
            f"'{dataset.name}' now has shape {tuple(dataset.shape)}"
        )
    net.to(device).eval().requires_grad_(False)
    return LoadedRun(cfg, net, build_objective(cfg, dataset), dataset, ckpt.step, ckpt.path, str(path), "onestep")


@FORMATS.register("onestep")
class OnestepFormat(CheckpointFormat):
    """onestep's own runs, checkpoint files and exports (a plain path without FORMAT: is this format).

    A run directory (its checkpoints/last.pt), a checkpoint file, or an export directory
    (model.safetensors + config.yaml from `onestep export`, read without pickle).

    The backbone is rebuilt from the run's resolved config with its EMA weights (``teacher_ema:
    false``, ``--no-ema``: the raw ones). As a teacher it is the run's network, called with h = 0
    (a flow-matching run is a velocity model; other objectives' nets are used the same way). As an
    initialisation its weights must fit the new backbone key for key.
    """

    name = "onestep"
    has_ema = True

    def where(self, path: str) -> str:
        return str(path)

    def load_teacher(
        self,
        path: str,
        *,
        num_heads: int | None = None,
        dtype: torch.dtype | None = None,
        use_ema: bool = True,
        **options,
    ) -> nn.Module:
        if options:
            raise ConfigError(f"{path}: unknown teacher option(s) {', '.join(options)}")
        if num_heads is not None:
            raise ConfigError(f"{path}: heads= is for public checkpoints; an onestep run knows its own backbone")
        net = build_net(read_onestep(path, use_ema=use_ema))
        return freeze(net if dtype is None else net.to(dtype))

    def init_state(
        self, path: str, backbone: nn.Module, *, num_heads: int | None = None, use_ema: bool = True
    ) -> dict[str, torch.Tensor]:
        if num_heads is not None:
            raise ConfigError(f"{path}: heads= is for public checkpoints; an onestep run knows its own backbone")
        ckpt = read_onestep(path, use_ema=use_ema)
        return check_backbone_state(
            ckpt.weights, backbone, f"{path}: weights do not fit this backbone", source="the checkpoint"
        )
