"""Checkpoint specs where the toolkit takes a checkpoint: teacher, initialisation, sampling model.

Every place accepts ``FORMAT:PATH[#heads=N]`` or a plain path (the ``onestep`` format):

* ``resolve_teacher(spec, dataset)``: ``objective.teacher``, any format, checked against the
  student's data shape and classes (``recipe_teacher(cfg, dataset)`` reads the recipe);
* ``init_weights(spec, backbone)``: ``train.init_from``; onestep runs as they are, ``sit:`` /
  ``repa_sit:`` converted into a ``dit_*`` backbone (``init_state``), ``dit:`` refused;
* ``open_model(spec)``: ``onestep sample`` / ``eval`` and ``onestep.load_model``. A public
  checkpoint samples as a flow-matching velocity model (Euler, ``nfe`` steps, optional
  classifier-free guidance on all channels) on latents of the shape and class count its weights
  say (4×H×W, 1000 classes for the ImageNet-256 files), x = 0.18215 × SD-VAE latent;
* ``spec_note(spec, ...)``: what ``onestep validate`` / ``train --dry-run`` say about a spec whose
  file is not there (a note; training makes it an error).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..config import Config
from ..data.base import Dataset
from ..data.latents import SD_VAE_SCALE
from ..registry import OBJECTIVES, ConfigError
from .base import as_spec, resolve_spec
from .data import ModelLatents, set_vae
from .onestep import LoadedRun, load_run

__all__ = ["PUBLIC_LATENT_SCALE", "resolve_teacher", "recipe_teacher", "init_weights", "open_model", "spec_note"]

PUBLIC_LATENT_SCALE = SD_VAE_SCALE  # DiT, SiT and REPA all train on 0.18215 × SD-VAE latents


def resolve_teacher(
    spec: Any,
    dataset: Dataset | None = None,
    *,
    use_ema: bool = True,
    device: Any = "cpu",
    where: str = "objective.teacher",
) -> nn.Module:
    """The frozen teacher of ``spec`` on ``device``; with ``dataset``, its input shape and class
    count must be the data's."""
    fmt, path, heads = resolve_spec(spec)
    try:
        teacher = fmt.load_teacher(path, use_ema=use_ema) if fmt.has_ema else fmt.load_teacher(path, num_heads=heads)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if dataset is not None:
        shape, classes = tuple(getattr(teacher, "input_shape", ())), int(getattr(teacher, "num_classes", 0) or 0)
        if shape != tuple(dataset.shape) or classes != dataset.num_classes:
            raise ConfigError(
                f"{where}={spec} was trained on data of shape {shape} with {classes} classes; this run's data "
                f"has shape {tuple(dataset.shape)} with {dataset.num_classes} classes"
            )
    return teacher.to(device)


def recipe_teacher(cfg: Config, dataset: Dataset | None, device: Any = "cpu") -> nn.Module | None:
    """The teacher a recipe names (``objective.teacher``, ``objective.teacher_ema``), or None."""
    spec = cfg.objective.get("teacher")
    if spec is None:
        return None
    if isinstance(spec, nn.Module):
        return spec
    return resolve_teacher(spec, dataset, use_ema=cfg.objective.get("teacher_ema", True), device=device)


def init_weights(spec: Any, backbone: nn.Module, *, use_ema: bool = True, where: str = "train.init_from"):
    """A state dict for ``backbone`` from ``spec`` (EMA weights of onestep runs by default)."""
    fmt, path, heads = resolve_spec(spec)
    if not fmt.can_init:
        raise ConfigError(f"{where}: {fmt.init_refusal(path)}")
    try:
        if fmt.has_ema:
            return fmt.init_state(path, backbone, use_ema=use_ema)
        return fmt.init_state(path, backbone, num_heads=heads)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def open_model(spec: Any, *, device: Any = "cpu", ema: bool = True, vae: str | None = None) -> LoadedRun:
    """The model of any checkpoint spec, ready to sample (module docstring)."""
    parsed = as_spec(spec)
    fmt, path, heads = resolve_spec(parsed)
    if fmt.has_ema:
        run = load_run(path, use_ema=ema, device=device)
    else:
        if not ema:
            raise ConfigError(f"{spec}: --no-ema is for onestep runs; a public checkpoint gives one set of weights")
        net = fmt.load_teacher(path, num_heads=heads).to(device)
        data = ModelLatents(
            tuple(net.input_shape),
            int(net.num_classes),
            scale=PUBLIC_LATENT_SCALE,
            name=f"{fmt.name} latents",
            reason=f"a public {fmt.name} checkpoint carries no data",
        )
        run = LoadedRun(None, net, OBJECTIVES.build("flow_matching"), data, None, Path(path), str(spec), fmt.name)
    run.spec, run.format = str(spec), fmt.name
    set_vae(run.dataset, vae)
    return run


def spec_note(spec: Any, *, where: str, init: bool = False) -> str | None:
    """None when ``spec`` names an existing file or directory; otherwise a note that it is missing.
    A bad format name, or (``init``) a format that cannot initialise, is a ConfigError."""
    fmt, path, _ = resolve_spec(spec)
    if init and not fmt.can_init:
        raise ConfigError(f"{where}: {fmt.init_refusal(path)}")
    if Path(path).exists():
        return None
    return f"{where}={spec}: not found here (needed when training starts)"
