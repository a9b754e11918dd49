"""The checkpoint-format interface and the spec-level entry points.

A format (registered in ``onestep.registry.FORMATS`` under its name) is a class whose instances

* ``load_teacher(path, *, num_heads=None, dtype=None, **options) -> nn.Module``: a frozen module
  in the backbone contract (``forward(x, t, h=None, y=None)``, ``num_classes``, ``input_shape``)
  returning onestep's velocity v(z_t, t) (t = 1 noise, v = e − x); it ignores h;
* ``init_state(path, backbone, *, num_heads=None) -> state_dict`` for an onestep backbone such that,
  at h = 0, ``backbone(z, t, 0, y)`` equals that velocity (or a one-line ConfigError when the file
  cannot be one);
* ``describe() -> str``: what the files are and how they are mapped (the class docstring);
* ``can_init`` (False: ``init_state`` is refused, ``init_refusal(path)`` says why) and ``has_ema``
  (the ``onestep`` format: ``load_teacher`` / ``init_state`` take ``use_ema`` instead of heads).

A plain path (no ``FORMAT:`` prefix) is the ``onestep`` format (``as_spec``).
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn

from ..registry import FORMATS, ConfigError
from .spec import CheckpointSpec, parse_spec

__all__ = [
    "CheckpointFormat",
    "get_format",
    "as_spec",
    "resolve_spec",
    "DEFAULT_FORMAT",
    "load_teacher",
    "init_state",
    "describe",
    "check_backbone_state",
]


class CheckpointFormat:
    """Base class of the registered checkpoint formats (module docstring)."""

    name: str = ""
    #: ``init_state`` can give an onestep backbone its weights (False: refused with one line).
    can_init: bool = True
    #: the files hold an EMA and a raw copy of the weights to choose from (``use_ema=``).
    has_ema: bool = False

    def describe(self) -> str:
        return inspect.getdoc(type(self)) or self.name

    def load_teacher(
        self, path: str, *, num_heads: int | None = None, dtype: torch.dtype | None = None, **options
    ) -> nn.Module:
        raise NotImplementedError

    def init_state(self, path: str, backbone: nn.Module, *, num_heads: int | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def where(self, path: str) -> str:
        return f"{self.name}:{path}"

    def init_refusal(self, path: str) -> str:
        """Why a file of this format cannot initialise a backbone (formats with ``can_init = False``)."""
        return f"{self.where(path)}: a '{self.name}' checkpoint cannot initialise a backbone"


def get_format(name: str) -> CheckpointFormat:
    """The registered format ``name`` (ConfigError listing the formats otherwise)."""
    return FORMATS.build(name)


DEFAULT_FORMAT = "onestep"  # a plain path (no FORMAT: prefix): a run directory, checkpoint or export


def as_spec(spec: str | os.PathLike | CheckpointSpec) -> CheckpointSpec:
    """The CheckpointSpec of ``FORMAT:PATH[#options]``; a plain path is ``onestep:PATH``."""
    if isinstance(spec, CheckpointSpec):
        return spec
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    parsed = parse_spec(spec)
    if parsed is None:
        if not isinstance(spec, str) or not spec:
            raise ConfigError(
                f"{spec!r} is not a checkpoint: expected a path or FORMAT:PATH; formats: {', '.join(FORMATS.names())}"
            )
        parsed = CheckpointSpec(DEFAULT_FORMAT, spec)
    return parsed


def resolve_spec(
    spec: str | os.PathLike | CheckpointSpec, num_heads: int | None = None
) -> tuple[CheckpointFormat, str, int | None]:
    """(format, path, heads) from a spec string (a plain path is the onestep format); the spec's
    ``#heads=`` and ``num_heads`` must agree."""
    parsed = as_spec(spec)
    heads = parsed.options.get("heads")
    if heads is not None and num_heads is not None and heads != num_heads:
        raise ConfigError(f"'{spec}': heads={heads} in the spec but num_heads={num_heads} given")
    return get_format(parsed.format), parsed.path, heads if heads is not None else num_heads


def load_teacher(
    spec: str | CheckpointSpec, *, num_heads: int | None = None, dtype: torch.dtype | None = None, **options
) -> nn.Module:
    """``load_teacher("sit:SiT-XL-2-256x256.pt")``: the frozen velocity teacher of a checkpoint."""
    fmt, path, heads = resolve_spec(spec, num_heads)
    return fmt.load_teacher(path, num_heads=heads, dtype=dtype, **options)


def init_state(
    spec: str | CheckpointSpec, backbone: nn.Module, *, num_heads: int | None = None
) -> dict[str, torch.Tensor]:
    """Weights for ``backbone`` that make ``backbone(z, t, 0, y)`` the checkpoint's velocity."""
    fmt, path, heads = resolve_spec(spec, num_heads)
    return fmt.init_state(path, backbone, num_heads=heads)


def describe(name: str) -> str:
    """The description of the format ``name``."""
    return get_format(name).describe()


def check_backbone_state(
    state: dict[str, torch.Tensor], backbone: nn.Module, where: str, source: str = "the converted file"
) -> dict[str, torch.Tensor]:
    """``state`` cast to the backbone's dtypes; one ConfigError line for the first key that differs."""
    own = backbone.state_dict()
    for key, value in own.items():
        if key not in state:
            raise ConfigError(f"{where}: the backbone has '{key}' {list(value.shape)}, {source} does not")
        if state[key].shape != value.shape:
            raise ConfigError(
                f"{where}: size mismatch at '{key}': {list(state[key].shape)} in the file vs "
                f"{list(value.shape)} in the backbone"
            )
    for key, value in state.items():
        if key not in own:
            raise ConfigError(f"{where}: {source} has '{key}' {list(value.shape)}, the backbone does not")
    return {k: state[k].to(dtype=v.dtype, device=v.device) for k, v in own.items()}
