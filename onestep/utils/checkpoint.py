"""Checkpoint files: plain dicts of state_dicts + the resolved config, written atomically and read
with ``torch.load(weights_only=True)`` (never unpickling code). Where they live in a run directory
is ``onestep.utils.rundir``'s business."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from onestep.registry import ConfigError
from onestep.utils.atomic import atomic_write

FORMAT = "onestep-checkpoint/1"


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save, atomically (``atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def read_state(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; any failure (including a pickle that would need code)
    is one ``ConfigError`` line."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        ) from None


def read_checkpoint_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """An onestep checkpoint file (``format`` checked)."""
    state = read_state(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an onestep checkpoint (format {FORMAT})")
    return state
