"""Version strings recorded in run directories and checkpoints."""

from __future__ import annotations

import platform

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    import torch

    return {"onestep": __version__, "torch": str(torch.__version__), "python": platform.python_version()}
