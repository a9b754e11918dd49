"""Reading checkpoint files safely and unwrapping them to a flat ``{key: tensor}`` state dict.

Files are opened only with ``torch.load(path, map_location="cpu", weights_only=True)`` (memory-mapped
when the file is in torch's zip format, so a 2.7 GB teacher is not read into memory twice): tensors,
containers and numbers, never code. The one extra type allowed is ``argparse.Namespace`` (a plain
attribute bag), because the official training scripts store their command-line ``args`` next to
the weights. A file that needs anything else (a pickled class or function) is refused with one
line naming the global it asked for; nothing in it runs.

Wrappers: a raw state dict is used as is; ``{"ema": ..., "model": ...}`` (the DiT / SiT / REPA
``train.py`` checkpoints) gives ``"ema"``, as the official samplers do for user checkpoints;
``{"model": ...}`` alone gives ``"model"``.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..registry import ConfigError

__all__ = ["read_checkpoint", "unwrap_state_dict", "rename_legacy_blocks", "block_indices", "SAFE_GLOBALS"]

SAFE_GLOBALS = (argparse.Namespace,)
WRAPPER_KEYS = ("ema", "model")  # preference order
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def unwrap_state_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """A raw state dict, or the ``"ema"`` (preferred) / ``"model"`` entry of a training checkpoint."""
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                return dict(obj[key])
        if str(obj.get("format", "")).startswith("onestep-checkpoint"):
            raise ConfigError(f"{where}: this is an onestep run checkpoint, not a file of this format")
        for key, value in obj.items():
            if not isinstance(value, torch.Tensor):
                raise ConfigError(
                    f"{where}: not a state dict: entry '{key}' holds a {type(value).__name__} and there is no "
                    f"'ema' or 'model' state dict to use"
                )
    raise ConfigError(f"{where}: not a state dict (a {type(obj).__name__}, expected a dict of tensors)")


def read_checkpoint(path: str | Path, where: str) -> dict[str, torch.Tensor]:
    """Load ``path`` with ``weights_only=True`` and unwrap it (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED.search(str(exc))
        if found is None:
            raise ConfigError(f"{where}: not a readable torch checkpoint ({_unpickler_reason(exc)})") from None
        raise ConfigError(
            f"{where}: refused: loading needs code that weights_only=True does not run (it asks for "
            f"'{found.group(1)}'); only tensors, containers and numbers are read"
        ) from None
    except Exception as exc:  # not a torch file at all: zip/pickle errors of many kinds
        raise ConfigError(f"{where}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    return unwrap_state_dict(obj, where)


def _unpickler_reason(exc: Exception) -> str:
    """The short reason inside torch's long weights_only message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else "unpickling failed")
    return lines[0] if lines else type(exc).__name__


def block_indices(state: dict[str, torch.Tensor], prefix: str = "blocks") -> list[int]:
    """Sorted distinct ``i`` of keys ``{prefix}.{i}.*``."""
    found = set()
    for key in state:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == prefix and parts[1].isdigit():
            found.add(int(parts[1]))
    return sorted(found)


def rename_legacy_blocks(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """REPA's legacy names ``decoder_blocks.{i}.* -> blocks.{i + encoder_depth}.*``.

    ``encoder_depth`` is the number of distinct ``blocks.{i}`` indices in the file. A state without
    ``decoder_blocks`` is returned unchanged.
    """
    if not block_indices(state, "decoder_blocks"):
        return state
    encoder_depth = len(block_indices(state, "blocks"))
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "decoder_blocks" and parts[1].isdigit():
            new = ".".join(["blocks", str(int(parts[1]) + encoder_depth), *parts[2:]])
            if new in state:
                raise ConfigError(f"{where}: legacy key '{key}' maps to '{new}', which is also in the file")
            key = new
        renamed[key] = value
    return renamed
