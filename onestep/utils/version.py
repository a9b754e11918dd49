"""Version strings recorded in run directories, checkpoints and exports (the full record of a
machine is ``onestep.utils.environment``)."""

from __future__ import annotations

import functools
import importlib.metadata as md
import platform
import subprocess
from pathlib import Path

__version__ = "0.1.0"


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (as pip knows it), or None."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def source_commit() -> str | None:
    """The git commit of the onestep source in use ("abc1234", "+dirty" when its package files have
    uncommitted changes), or None when onestep is not running from a git checkout (a wheel install)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "onestep"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """onestep's version and git commit (None outside a checkout), torch, torchvision and Python."""
    import torch

    return {
        "onestep": __version__,
        "commit": source_commit(),
        "torch": str(torch.__version__),
        "torchvision": package_version("torchvision"),
        "python": platform.python_version(),
    }
