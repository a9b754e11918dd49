"""Checkpoints: plain dicts of state_dicts + the resolved config, written atomically.

Layout of a run directory::

    RUN/config.yaml  RUN/stats.jsonl  RUN/metrics.jsonl  RUN/samples/  RUN/checkpoints/{last.pt, step_000001000.pt}

Every checkpoint loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from onestep.registry import ConfigError

FORMAT = "onestep-checkpoint/1"
_NUMBERED = re.compile(r"^step_(\d+)\.pt$")


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def numbered_name(step: int) -> str:
    return f"step_{step:09d}.pt"


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], *, numbered: bool, keep: int = 0) -> Path:
    """Write ``last.pt`` (and a numbered copy); keep only the ``keep`` newest numbered ones (0 = all)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    state = {"format": FORMAT, **state}
    if numbered:
        atomic_save(state, ckpt_dir / numbered_name(state["step"]))
    atomic_save(state, ckpt_dir / "last.pt")
    if keep > 0:
        for old in list_numbered(ckpt_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return ckpt_dir / "last.pt"


def list_numbered(ckpt_dir: str | Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NUMBERED.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (-> checkpoints/last.pt) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        cand = path / "checkpoints" / "last.pt"
        if not cand.is_file():
            raise ConfigError(f"no checkpoint in run directory {path} (expected {cand})")
        return cand
    if not path.is_file():
        raise ConfigError(f"checkpoint or run directory not found: {path}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an onestep checkpoint (format {FORMAT})")
    return state
