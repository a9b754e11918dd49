"""Turn a validated Config into objects: the one place where recipe sections become factory kwargs.

Checkpoints (run directories, exports, public files) are read by ``onestep.formats``, which calls
these builders (``onestep.formats.load_run``).

``check_buildable(cfg)`` builds everything a recipe names (the backbone on the meta device, so no
large weights are allocated; the data unless its files are missing) so that every value a factory
refuses is one ``ConfigError`` line before any work starts (``onestep validate``, ``train``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from onestep.config import REGULARIZER_LOOP_KEYS, Config
from onestep.data.base import Dataset
from onestep.registry import BACKBONES, DATASETS, LOGGERS, METRICS, OBJECTIVES, REGULARIZERS, ConfigError, DataNotFound
from onestep.sampling import with_guidance


def _kwargs(entry: dict[str, Any], exclude: tuple[str, ...] = ("name",)) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in exclude}


def build_dataset(cfg: Config) -> Dataset:
    return DATASETS.build(cfg.data["name"], **_kwargs(cfg.data))


def backbone_kwargs(cfg: Config, dataset: Dataset | None) -> dict[str, Any]:
    """Backbone kwargs with input_shape / num_classes filled from the data (a recipe value must agree)."""
    kwargs = _kwargs(cfg.backbone)
    if dataset is None:
        return kwargs
    for key, value in (("input_shape", tuple(dataset.shape)), ("num_classes", dataset.num_classes)):
        given = kwargs.get(key)
        if given is not None and (tuple(given) if isinstance(given, (list, tuple)) else given) != value:
            raise ConfigError(
                f"backbone.{key}={given} does not match the data '{cfg.data['name']}' ({key}={value}); "
                f"remove it from the recipe or change the data"
            )
        kwargs[key] = list(value) if isinstance(value, tuple) else value
    return kwargs


def build_backbone(cfg: Config, dataset: Dataset | None) -> nn.Module:
    kwargs = backbone_kwargs(cfg, dataset)
    if "input_shape" in kwargs:
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    return BACKBONES.build(cfg.backbone["name"], **kwargs)


# Objective keys handled here rather than by the factory (the teacher spec is resolved by the caller).
OBJECTIVE_BUILD_KEYS = ("name", "teacher", "teacher_ema")


def build_objective(cfg: Config, dataset: Dataset | None = None, teacher: nn.Module | None = None):
    """The objective of ``cfg``; ``teacher`` is the frozen module for a recipe's ``objective.teacher``
    (the formats layer turns the spec into one: ``onestep.formats.resolve_teacher``) or None
    (sampling, evaluation, validation: the objective is built without it)."""
    kwargs = _kwargs(cfg.objective, OBJECTIVE_BUILD_KEYS)
    if teacher is not None:
        kwargs["teacher"] = teacher
    return OBJECTIVES.build(cfg.objective["name"], **kwargs)


@dataclass
class RegularizerTerm:
    name: str
    weight: float
    blocks: list[int]
    fn: Any
    label: str


def resolve_blocks(spec: Any, net: nn.Module) -> list[int]:
    """'encoder' -> the backbone's default encoder blocks; negative indices -> absolute ones."""
    blocks = list(getattr(net, "encoder_blocks", ())) if spec == "encoder" else list(spec)
    n = int(getattr(net, "num_blocks", 0))
    out = []
    for b in blocks:
        if not -n <= b < n:
            raise ConfigError(f"block index {b} is out of range for this backbone ({n} blocks: {-n}..{n - 1})")
        out.append(b % n)
    if not out:
        raise ConfigError("regularizer blocks resolved to an empty list")
    return out


def build_regularizers(cfg: Config, net: nn.Module) -> list[RegularizerTerm]:
    terms = []
    for i, entry in enumerate(cfg.regularizers):
        fn = REGULARIZERS.build(entry["name"], **_kwargs(entry, REGULARIZER_LOOP_KEYS))
        blocks = resolve_blocks(entry["blocks"], net)
        label = entry["name"] if len(cfg.regularizers) == 1 else f"{entry['name']}{i}"
        terms.append(RegularizerTerm(entry["name"], float(entry["weight"]), blocks, fn, label))
    return terms


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def check_pairing(cfg: Config, objective, net: nn.Module) -> None:
    """One ConfigError line if the objective cannot train this backbone (``Objective.check_backbone``) or
    ``eval.guidance`` is set for a model that takes no guidance conditions."""
    try:
        objective.check_backbone(net)
    except ValueError as exc:
        raise ConfigError(
            f"objective '{cfg.objective['name']}' with backbone '{cfg.backbone['name']}': {exc}"
        ) from None
    omegas = cfg.eval.guidance if isinstance(cfg.eval.guidance, list) else [cfg.eval.guidance]
    try:
        for omega in omegas:
            with_guidance(objective, net, omega, cfg.eval.guidance_interval if omega is not None else None)
    except ValueError as exc:
        raise ConfigError(f"eval.guidance: {exc}") from None


@dataclass
class BuildCheck:
    """What ``check_buildable`` found: the dataset (None when its files are missing, with the reason)
    and the parameter count of the backbone."""

    dataset: Dataset | None
    data_note: str | None
    parameters: int
    #: Parameters of the inference model when the backbone has training-only parts (an auxiliary
    #: v-head: ``inference_parameters()``), else None.
    inference_parameters: int | None = None


def check_buildable(cfg: Config, *, need_data: bool = False) -> BuildCheck:
    """Build the data, the backbone (on the meta device), the objective (without its teacher) and the
    regularizers, so every range error is a ConfigError now. Missing data files are a note (an error
    with ``need_data``); the backbone then takes input_shape/num_classes from the recipe."""
    note = None
    try:
        dataset = build_dataset(cfg)
    except DataNotFound as exc:
        if need_data:
            raise
        dataset, note = None, str(exc).splitlines()[0]
    with torch.device("meta"):
        try:
            net = build_backbone(cfg, dataset)
        except TypeError as exc:  # a backbone needing input_shape/num_classes the recipe does not give
            raise ConfigError(
                f"backbone '{cfg.backbone['name']}': {exc} (the data did not load, so the recipe "
                f"must give backbone.input_shape and backbone.num_classes)"
            ) from None
        build_regularizers(cfg, net)
    check_pairing(cfg, build_objective(cfg, dataset), net)
    for registry, specs in ((METRICS, cfg.eval.metrics or []), (LOGGERS, cfg.train.loggers)):
        for spec in specs:  # factories only check their options (nothing is opened or downloaded)
            name, options = (spec, {}) if isinstance(spec, str) else (spec["name"], _kwargs(spec))
            registry.build(name, **options)
    inference = net.inference_parameters() if hasattr(net, "inference_parameters") else None
    return BuildCheck(dataset, note, count_parameters(net), inference)
